"""One way every pykernels module takes over a torch module: ``from_torch`` and ``pykernels.patch`` use it."""
from __future__ import annotations

import copy
import warnings
from typing import Type, TypeVar

import torch

from .. import backends

M = TypeVar("M", bound=torch.nn.Module)


def adopt(cls: Type[M], module: torch.nn.Module, **extras) -> M:
    """``module`` as an instance of ``cls`` (a pykernels subclass of its torch class), built without running any
    constructor: the same Parameter and buffer objects (an optimizer built before the swap keeps updating the
    model, tied weights stay tied, nothing is copied), the same submodules, attributes, hooks and training mode.

    The containers in the instance dict (``_parameters``, hooks, an RNN's ``_flat_weights``) are copied one
    level deep, so later registrations on either module do not leak into the other. ``extras`` are the
    pykernels keyword-only attributes (``backend``, ``z_loss``, ...) set on the new module."""
    # Exact types only, as patch(): a subclass may override forward, and a parametrized module (weight_norm) is a
    # generated subclass whose weights are properties; rebuilding either as ``cls`` would drop what it adds.
    if type(module) not in (cls.__bases__[0], cls):
        raise TypeError(f"{cls.__name__}.from_torch: module must be exactly a {cls.__bases__[0].__module__}."
                        f"{cls.__bases__[0].__name__} (subclasses and parametrized modules are not converted), "
                        f"got {type(module).__name__}")
    backends.backend_name(extras.get("backend"))
    new = cls.__new__(cls)
    new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, list, set)) else v
                         for k, v in module.__dict__.items()})
    for name, value in extras.items():
        setattr(new, name, value)
    if new.__dict__.get("_compiled_call_impl") is not None:
        # Module.compile() in place: that compiled callable closes over the old module's forward, which would keep
        # running. The options it was compiled with are not recorded: the replacement is compiled with defaults.
        warnings.warn(f"{cls.__name__}.from_torch: the {type(module).__name__} was compiled in place "
                      f"(Module.compile); its replacement is compiled again with default options: call .compile(...) "
                      f"on it to pass yours", stacklevel=3)
        new._compiled_call_impl = None
        new.compile()
    return new
