"""Drop-in ``torch.nn`` modules."""
from .attention import MultiheadAttention
from .cross_entropy import CrossEntropyLoss
from .linear_cross_entropy import LinearCrossEntropyLoss
from .lstm import LSTM, LSTMCell

__all__ = ["MultiheadAttention", "CrossEntropyLoss", "LinearCrossEntropyLoss", "LSTM", "LSTMCell"]
