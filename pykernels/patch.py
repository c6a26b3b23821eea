"""``pykernels.patch(model)``: swap torch.nn modules for their pykernels drop-ins, in place, weights kept."""
from __future__ import annotations

from typing import Callable, Dict, Type

import torch

from . import nn as pnn

# torch module type -> converter. Exact types only: a user's subclass may override forward, and swapping it
# would silently drop that behaviour.
_CONVERTERS: Dict[Type[torch.nn.Module], Callable[[torch.nn.Module], torch.nn.Module]] = {
    torch.nn.CrossEntropyLoss: pnn.CrossEntropyLoss.from_torch,
    torch.nn.MultiheadAttention: pnn.MultiheadAttention.from_torch,
}


def register(torch_type: Type[torch.nn.Module], converter: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
    _CONVERTERS[torch_type] = converter


def patch(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every supported submodule (and ``model`` itself's children, recursively) in place; returns model.

    If ``model`` itself is a supported module, its replacement is returned (a module cannot replace itself).
    """
    conv = _CONVERTERS.get(type(model))
    if conv is not None:
        return conv(model)
    for name, child in list(model.named_children()):
        conv = _CONVERTERS.get(type(child))
        if conv is not None:
            setattr(model, name, conv(child))
        else:
            patch(child)
    return model
