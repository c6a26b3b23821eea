"""Drop-in ``torch.nn`` modules."""
from .attention import MultiheadAttention
from .cross_entropy import CrossEntropyLoss
from .linear_cross_entropy import LinearCrossEntropyLoss

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss", "MultiheadAttention"]
