"""Training: the DeepSpeed engine and Trainer, objectives, EMA, checkpoints, the run lock, the planner.

``python -m framework.train --config X.yaml key=value ...`` runs ``framework.train.cli``."""
