"""After training: a checkpoint as a plain learner, exported as a standalone detector, run
on image files.

- `trained.py`: `load_trained`, a finished checkpoint as a plain PyTorch learner;
- `export.py`: `python -m ulm_dist.export`, the best checkpoint as a detector folder;
- `artifact.py`: that folder's layout and `load_detector`, which needs only PyTorch;
- `onnx_detector.py`: the same detector as `detector.onnx`, written, checked and run with
  onnxruntime (the `onnx` extra);
- `predict.py`: `python -m ulm_dist.predict`, landmarks of image files.
"""
