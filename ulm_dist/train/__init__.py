"""The train command, `python -m ulm_dist.train`: Ray Train workers with DeepSpeed.

- `driver.py`: the command line and `train(cfg)`, which checks, starts the workers and reports;
- `worker.py`: `train_func`, each worker's loop around one `train_step`;
- `engine.py`: the DeepSpeed config and engine (the one place that knows ZeRO and precision);
- `checkpoint.py`: what a checkpoint holds, how it is written, restored and marked complete;
- `metrics_log.py`: the run's metrics.jsonl, TensorBoard events and progress lines.
"""
