"""``pykernels.patch(model)``: swap torch.nn modules for their pykernels drop-ins, in place, weights kept."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Type

import torch

from . import nn as pnn

# torch module type -> converter. Exact types only: a user's subclass may override forward, and swapping it
# would silently drop that behaviour.
_CONVERTERS: Dict[Type[torch.nn.Module], Callable[..., torch.nn.Module]] = {
    torch.nn.CrossEntropyLoss: pnn.CrossEntropyLoss.from_torch,
    torch.nn.MultiheadAttention: pnn.MultiheadAttention.from_torch,
    torch.nn.LSTM: pnn.LSTM.from_torch,
    torch.nn.LSTMCell: pnn.LSTMCell.from_torch,
}
if hasattr(torch.nn, "LinearCrossEntropyLoss"):  # torch >= 2.13
    _CONVERTERS[torch.nn.LinearCrossEntropyLoss] = pnn.LinearCrossEntropyLoss.from_torch


def register(torch_type: Type[torch.nn.Module], converter: Callable[..., torch.nn.Module]) -> None:
    """Make ``patch`` convert modules of exactly ``torch_type`` with ``converter(module, backend=...)``."""
    _CONVERTERS[torch_type] = converter


def patch(model: torch.nn.Module, *, backend: Optional[str] = None) -> torch.nn.Module:
    """Replace every torch.nn.MultiheadAttention, LSTM, LSTMCell, CrossEntropyLoss and LinearCrossEntropyLoss
    inside ``model`` (exact types; subclasses are left alone) by the pykernels module, in place; returns
    ``model``.

    The replacements share the originals' Parameter and buffer objects, so an optimizer created before the call
    keeps training the model, the state_dict keys are unchanged and tied weights stay tied. A module reachable
    under several names becomes one replacement. ``backend`` is passed to every replacement (None: automatic).
    If ``model`` itself is a supported module, its replacement is returned (a module cannot replace itself).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    done: Dict[int, torch.nn.Module] = {}

    def convert(m: torch.nn.Module) -> torch.nn.Module:
        if id(m) not in done:
            conv = _CONVERTERS.get(type(m))
            done[id(m)] = conv(m, backend=backend) if conv is not None else m
            if conv is None:
                for name, child in list(m._modules.items()):  # named_children() would skip a repeated child
                    new = None if child is None else convert(child)
                    if new is not child:
                        setattr(m, name, new)
        return done[id(m)]

    return convert(model)
