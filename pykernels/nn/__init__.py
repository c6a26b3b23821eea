"""Drop-in ``torch.nn`` modules."""
from .cross_entropy import CrossEntropyLoss

__all__ = ["CrossEntropyLoss"]
