"""One training loop for every model (see ``loop``): ``upcycle.train.train(model, config, out, resume=...)``."""

from .loop import TrainingDiverged, train

__all__ = ["TrainingDiverged", "train"]
