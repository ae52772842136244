"""ulm_dist: distributed unsupervised object-landmark learning."""

__version__ = "0.1.0"
