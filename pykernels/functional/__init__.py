"""Drop-in replacements for ``torch.nn.functional`` calls: same signatures and semantics, keyword-only extras.

One module per op family; each adds its public names here.
"""
from .attention import scaled_dot_product_attention, varlen_attention
from .cross_entropy import cross_entropy
from .linear_cross_entropy import linear_cross_entropy
from .lstm import lstm, lstm_cell

__all__ = ["cross_entropy", "linear_cross_entropy", "lstm", "lstm_cell", "scaled_dot_product_attention", "varlen_attention"]
