"""Hyperparameter sweeps, `python -m ulm_dist.tune`: Ray Tune over training runs.

- `sweep.py`: the command line and `run_sweep` (search space, searcher, scheduler, trials);
- `config.py`: the sweep's typed config (base job, space, search, scheduler);
- `results.py`: one row per trial, the ranking, what is written to the sweep's folder;
- `plot.py`: the metric against each searched parameter (matplotlib).
"""
