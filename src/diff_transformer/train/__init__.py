"""Training: configuration, optimizer and schedule, checkpoints, distributed wrappers, the loop, compare."""

from .config import RunConfig, TrainConfig, apply_overrides
from .trainer import EXIT_DIVERGED, EXIT_PREEMPTED, Preempted, TrainingDiverged, TrainResult, run_training

__all__ = ["EXIT_DIVERGED", "EXIT_PREEMPTED", "Preempted", "RunConfig", "TrainConfig", "TrainResult",
           "TrainingDiverged", "apply_overrides", "run_training"]
