"""Drop-in replacements for ``torch.nn.functional`` calls: same signatures and semantics, keyword-only extras.

One module per op family; each adds its public names here.
"""
from .cross_entropy import cross_entropy

__all__ = ["cross_entropy"]
