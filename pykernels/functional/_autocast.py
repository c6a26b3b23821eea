"""torch.autocast's rules for the loss functions, so that the drop-ins return under autocast what torch's
functions return: ``cross_entropy`` is on autocast's float32 list (half-precision logits in, float32 loss out)
and ``linear`` on its lower-precision list (fp32 activations and weights in, the autocast dtype out), so torch's
``linear_cross_entropy`` (linear, then cross_entropy) multiplies in the autocast dtype and returns a float32
loss. Our kernels need no float32 copy of the logits for that: they accumulate in float32 either way."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def enabled(t: Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(t.device.type)
    except RuntimeError:  # a device type autocast does not know (meta): no autocast there
        return False


def eligible(t) -> bool:
    """The tensors autocast casts: floating point other than float64 (which it leaves alone). Anything else
    (None, a bool mask, a wrong type the caller's checks then name) passes through."""
    return isinstance(t, Tensor) and t.dtype.is_floating_point and t.dtype != torch.float64


def to_lower_precision(t: Optional[Tensor]) -> Optional[Tensor]:
    """What autocast does to an argument of an op on its lower-precision list (``linear``, SDPA, the LSTM)."""
    return t.to(torch.get_autocast_dtype(t.device.type)) if eligible(t) else t


def off(t: Tensor):
    """The context the kernels run in once the autocast casts are done (the reference's torch ops must not be
    cast a second time)."""
    return torch.autocast(t.device.type, enabled=False)
