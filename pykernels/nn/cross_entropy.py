from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..functional import cross_entropy as _cross_entropy
from .. import backends
from ._adopt import adopt


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` on pykernels' fused kernels.

    Same constructor, attributes, buffers (``weight``) and behaviour; still an instance of
    ``torch.nn.CrossEntropyLoss``. Keyword-only extras: ``z_loss``, ``fused``, ``backend`` (see
    ``pykernels.functional.cross_entropy``).
    """

    def __init__(self, weight: Optional[Tensor] = None, size_average=None, ignore_index: int = -100,
                 reduce=None, reduction: str = "mean", label_smoothing: float = 0.0, *, z_loss: float = 0.0,
                 fused: Optional[bool] = None, backend: Optional[str] = None) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.fused = fused
        self.backend = backends.backend_name(backend)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return _cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing,
                               z_loss=self.z_loss, fused=self.fused, backend=self.backend)

    @classmethod
    def from_torch(cls, module: torch.nn.CrossEntropyLoss, *, z_loss: float = 0.0, fused: Optional[bool] = None,
                   backend: Optional[str] = None) -> "CrossEntropyLoss":
        """The same loss as a pykernels one, sharing its ``weight`` buffer, settings and hooks."""
        return adopt(cls, module, z_loss=z_loss, fused=fused, backend=backend)

    def extra_repr(self) -> str:  # torch's module prints none of its settings; ours prints the extras
        parts = []
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        if self.backend:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)
