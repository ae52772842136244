"""The train command, `python -m ulm_dist.train`: Ray Train workers with DeepSpeed.

- `driver.py`: the command line and `train(cfg)`, which checks, starts the workers and reports;
- `preflight.py`: what the driver checks and decides before Ray starts (data, weights,
  device, precision); the sweep uses it too;
- `worker.py`: `train_func`, each worker's loop around one `train_step`;
- `engine.py`: the DeepSpeed config and engine (the one place that knows ZeRO, precision,
  compilation and the convolutions' layout);
- `checkpoint.py`: what a checkpoint holds, how it is written, restored and marked complete;
- `meters.py`: the step's timing (data wait, phases, collectives) and memory, run-wide;
- `metrics_log.py`: the run's metrics.jsonl, TensorBoard events and progress lines;
- `curves.py`: training_curves.png, the losses and val error against step (matplotlib);
- `tracking.py`: `train.tracking: mlflow`, the run's params, metrics and artifacts in MLflow.
"""
