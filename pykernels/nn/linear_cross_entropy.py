"""pykernels.nn.LinearCrossEntropyLoss: torch's module (2.13+) on pykernels' fused linear cross-entropy."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..functional.linear_cross_entropy import linear_cross_entropy as _linear_cross_entropy
from .. import backends
from ..errors import ArgumentValueError
from ._adopt import adopt

_TorchLCE = getattr(torch.nn, "LinearCrossEntropyLoss", None)
_Base = _TorchLCE if _TorchLCE is not None else torch.nn.modules.loss._WeightedLoss


class LinearCrossEntropyLoss(_Base):
    """``torch.nn.LinearCrossEntropyLoss`` without the logits.

    Same constructor, submodule ``linear`` (a ``torch.nn.Linear`` storing the flattened (C*prod(out_features), H)
    weight), ``weight`` buffer, state_dict keys and forward(input, target); an instance of torch's class where
    torch has it (2.13+), a ``torch.nn.modules.loss._WeightedLoss`` with the same layout where it does not.
    ``options`` is accepted and ignored. Keyword-only extras: ``z_loss``, ``softcap``, ``group``, ``vocab_start``,
    ``vocab_size``, ``fused``, ``backend`` (see ``pykernels.functional.linear_cross_entropy``).

    Vocab-parallel (``group``): ``linear`` holds this rank's shard, ``num_classes`` its rows; ``weight`` is the class
    weight of the whole vocabulary, (vocab_size,) (default vocab_size: world size x num_classes), replicated.
    """

    def __init__(self, in_features: int, num_classes: int, *, out_features: Tuple[int, ...] = (), bias: bool = False,
                 device=None, dtype=None, reduction: str = "mean", weight: Optional[Tensor] = None,
                 ignore_index: Optional[int] = None, label_smoothing: float = 0.0, options=None,
                 z_loss: float = 0.0, softcap: float = 0.0, group=None, vocab_start: Optional[int] = None,
                 vocab_size: Optional[int] = None, fused: Optional[bool] = None,
                 backend: Optional[str] = None) -> None:
        if group is None and (vocab_start is not None or vocab_size is not None):
            raise ArgumentValueError("LinearCrossEntropyLoss: vocab_start and vocab_size place a shard of the "
                                     "vocabulary: they need group=")
        # vocab-parallel: the weight spans the whole vocabulary, not num_classes (the shard): the call checks it
        full_weight, weight = (weight, None) if group is not None else (None, weight)
        if _TorchLCE is not None:
            super().__init__(in_features, num_classes, out_features=tuple(out_features), bias=bias, device=device,
                             dtype=dtype, reduction=reduction, weight=weight, ignore_index=ignore_index,
                             label_smoothing=label_smoothing, options=options)
        else:
            if weight is not None and tuple(weight.shape) != (num_classes,):
                raise ArgumentValueError(f"LinearCrossEntropyLoss: weight must have shape ({num_classes},), got "
                                         f"{tuple(weight.shape)}")
            if not 0.0 <= label_smoothing <= 1.0:
                raise ArgumentValueError(f"LinearCrossEntropyLoss: label_smoothing must be in [0, 1], got "
                                         f"{label_smoothing}")
            super().__init__(weight=weight, size_average=None, reduce=None, reduction=reduction)
            self.num_classes = num_classes
            self.out_features = tuple(out_features)
            self.ignore_index = ignore_index
            self.label_smoothing = label_smoothing
            self.linear = torch.nn.Linear(in_features, math.prod(out_features, start=num_classes), bias=bias,
                                          device=device, dtype=dtype)
            self.options = options
        if full_weight is not None:
            self.weight = full_weight  # the buffer torch's constructor registered (None there)
        self.z_loss = z_loss
        self.softcap = softcap
        self.group = group
        self.vocab_start = vocab_start
        self.vocab_size = vocab_size
        self.fused = fused
        self.backend = backends.backend_name(backend)

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        lw = self.linear.weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
        lb = None if self.linear.bias is None else self.linear.bias.reshape((self.num_classes, *self.out_features))
        return _linear_cross_entropy(input, lw, target, linear_bias=lb, weight=self.weight, reduction=self.reduction,
                                     ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                                     z_loss=self.z_loss, softcap=self.softcap, group=self.group,
                                     vocab_start=getattr(self, "vocab_start", None),
                                     vocab_size=getattr(self, "vocab_size", None), fused=self.fused,
                                     backend=self.backend)

    @classmethod
    def from_torch(cls, module: torch.nn.Module, *, z_loss: float = 0.0, softcap: float = 0.0, group=None,
                   vocab_start: Optional[int] = None, vocab_size: Optional[int] = None, fused: Optional[bool] = None,
                   backend: Optional[str] = None) -> "LinearCrossEntropyLoss":
        """The drop-in for a ``torch.nn.LinearCrossEntropyLoss``: the same ``linear`` submodule (its Parameter
        objects, so optimizer state stays attached), ``weight`` buffer, settings and hooks."""
        if group is None and (vocab_start is not None or vocab_size is not None):
            raise ArgumentValueError("LinearCrossEntropyLoss: vocab_start and vocab_size place a shard of the "
                                     "vocabulary: they need group=")
        return adopt(cls, module, z_loss=z_loss, softcap=softcap, group=group, vocab_start=vocab_start,
                     vocab_size=vocab_size, fused=fused, backend=backend)

    def extra_repr(self) -> str:
        parts = [f"in_features={self.linear.in_features}", f"num_classes={self.num_classes}",
                 f"out_features={self.out_features}", f"bias={self.linear.bias is not None}",
                 f"reduction={self.reduction}", f"ignore_index={self.ignore_index}",
                 f"label_smoothing={self.label_smoothing}", f"options={getattr(self, 'options', None)}"]
        if self.z_loss:
            parts.append(f"z_loss={self.z_loss}")
        if self.softcap:
            parts.append(f"softcap={self.softcap}")
        for name in ("vocab_start", "vocab_size", "fused"):
            if getattr(self, name, None) is not None:
                parts.append(f"{name}={getattr(self, name)}")
        if self.backend:
            parts.append(f"backend={self.backend!r}")
        return ", ".join(parts)
