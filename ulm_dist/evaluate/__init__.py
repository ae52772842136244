"""Evaluation, `python -m ulm_dist.evaluate`: the landmark-regression protocol and its uses.

- `regression.py`: the protocol on tensors (linear map, normalisers, errors);
- `protocols.py`: each benchmark's normaliser, splits and visibility rule, from the manifest;
- `command.py`: the command line on a checkpoint and a data set;
- `periodic.py`: evaluation on `data.val` during training (the `val/` metrics);
- `pictures.py`: the pictures of an evaluation (landmarks, what a learner draws).
"""
