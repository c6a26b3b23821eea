"""``pykernels.patch(model)``: swap torch.nn modules for their pykernels drop-ins, in place, weights kept.
``pykernels.patch_functional()``: route torch.nn.functional's calls to pykernels' functions, for code that calls
them rather than holding the modules (Hugging Face models call F.scaled_dot_product_attention and F.cross_entropy)."""
from __future__ import annotations

import functools
import threading
from typing import Callable, Dict, Iterable, Optional, Type

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

from . import _native, backends
from . import functional as pf
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


def _share_hooks(new: torch.nn.Module, old: torch.nn.Module) -> None:
    """The replacement takes the original's hook dicts themselves (from_torch copies them, since both modules may
    live on): a RemovableHandle from before the swap holds a reference to its dict and must still remove the hook."""
    for name, value in old.__dict__.items():
        if "hooks" in name and isinstance(value, dict):
            new.__dict__[name] = value


def patch(model: torch.nn.Module, *, backend: Optional[str] = None) -> torch.nn.Module:
    """Replace every torch.nn.MultiheadAttention, LSTM, LSTMCell, CrossEntropyLoss and LinearCrossEntropyLoss
    inside ``model`` (exact types; subclasses are left alone) by the pykernels module, in place; returns
    ``model``.

    The replacements share the originals' Parameter and buffer objects, so an optimizer created before the call
    keeps training the model, the state_dict keys are unchanged and tied weights stay tied. A module reachable
    under several names becomes one replacement. ``backend`` is passed to every replacement (None: automatic).
    If ``model`` itself is a supported module, its replacement is returned (a module cannot replace itself).
    pykernels modules already in ``model`` (an earlier patch) take ``backend`` when one is given.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    backends.backend_name(backend)
    done: Dict[int, torch.nn.Module] = {}
    drop_ins = tuple(c.__self__ for c in _CONVERTERS.values() if isinstance(getattr(c, "__self__", None), type))

    def convert(m: torch.nn.Module) -> torch.nn.Module:
        if id(m) not in done:
            conv = _CONVERTERS.get(type(m))
            done[id(m)] = conv(m, backend=backend) if conv is not None else m
            if conv is not None:
                _share_hooks(done[id(m)], m)
            elif backend is not None and isinstance(m, drop_ins):  # patched before: it ignored the new backend
                m.backend = backend
            if conv is None:
                for name, child in list(m._modules.items()):  # named_children() would skip a repeated child
                    new = None if child is None else convert(child)
                    if new is not child:
                        setattr(m, name, new)
        return done[id(m)]

    return convert(model)


# torch.nn.functional name -> pykernels function (pykernels' own hand-offs to torch call _native's, captured at import)
FUNCTIONALS: Dict[str, Callable] = {"cross_entropy": pf.cross_entropy,
                                    "scaled_dot_product_attention": pf.scaled_dot_product_attention}
if _native.linear_cross_entropy is not None:  # torch >= 2.13
    FUNCTIONALS["linear_cross_entropy"] = pf.linear_cross_entropy


# torch.Tensor, Parameter, and the tensors of torch's own tracers (non-strict torch.export and make_fx hand the
# model FakeTensors, functionalised): those stand for plain tensors, and the traced graph must hold our ops.
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter, FakeTensor, FunctionalTensor)


def _plain(tensors: Iterable) -> bool:
    """Every tensor argument a dense strided torch.Tensor or Parameter (or a tracer's stand-in for one). Nested
    (jagged) tensors, sparse layouts and tensor subclasses (DTensor, __torch_function__ wrappers) stay with the
    function the name was bound to."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and (type(t) not in _PLAIN_TYPES or t.is_nested
                                            or t.layout != torch.strided):
            return False
    return True


def _route(ours: Callable, theirs: Callable, backend: Optional[str]) -> Callable:
    """``theirs`` is what the name was bound to (torch's function, or another library's patch of it), for the
    tensors pykernels leaves alone."""
    def call(*args, **kwargs):
        if not (_plain(args) and _plain(kwargs.values())):
            return theirs(*args, **kwargs)
        if backend is None:
            return ours(*args, **kwargs)
        entry = backends._push(backend)  # use_backend's preference, without a context manager to trace
        try:
            return ours(*args, **kwargs)
        finally:
            backends._preferred.remove(entry)

    functools.update_wrapper(call, theirs)  # torch's name, docstring and signature (inspect follows __wrapped__)
    return call


class _Bound:
    """One open patch of one name: its routed function, and what the name held before it (``previous``)."""
    __slots__ = ("routed", "previous")

    def __init__(self, routed: Callable, previous: Callable):
        self.routed, self.previous = routed, previous


# name -> its open patches, oldest first. Undone in any order (two threads' with-blocks overlap without nesting),
# each takes itself out: the newest gives the name back what was there before it; an older one hands what was there
# before it to the patch opened on top of it, so the name ends as it was once every patch of it is undone.
_open: Dict[str, list] = {}
_open_lock = threading.Lock()


class FunctionalPatch:
    """The names ``patch_functional`` rebound in torch.nn.functional. ``undo()``, or leaving its ``with`` block,
    takes this patch out: a name gets back what was there before it, unless a patch opened later still holds the
    name (patches may be undone in any order, as threads' blocks end)."""

    def __init__(self, bound: Dict[str, _Bound]):
        self._bound = bound

    @property
    def names(self) -> tuple:
        return tuple(self._bound)

    def undo(self) -> None:
        with _open_lock:
            undone, self._bound = self._bound, {}
            for name, bound in undone.items():
                stack = _open[name]
                i = stack.index(bound)  # (_Bound has no __eq__: by identity)
                del stack[i]
                if i < len(stack):  # a later patch is open: it gives back what this one would have
                    if stack[i].previous is bound.routed:  # (not another library's patch made in between)
                        stack[i].previous = bound.previous
                else:
                    setattr(F, name, bound.previous)
        if undone:
            backends.logger.info("patch_functional undone: %s", ", ".join(undone))

    def __enter__(self) -> "FunctionalPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"FunctionalPatch({', '.join(self._bound) or 'undone'})"


def patch_functional(names: Optional[Iterable[str]] = None, *, backend: Optional[str] = None) -> FunctionalPatch:
    """Rebind ``torch.nn.functional.<name>`` to pykernels' function of that name, for every name in ``names``
    (default: every one in ``FUNCTIONALS``: cross_entropy, scaled_dot_product_attention and, on torch >= 2.13,
    linear_cross_entropy). Returns a ``FunctionalPatch``: call ``undo()`` or use it as a context manager::

        pykernels.patch_functional()                 # for the whole process
        with pykernels.patch_functional(["cross_entropy"]):
            loss = model(x, labels=y).loss           # transformers' loss goes through pykernels

    Everything that looks the name up at call time follows: torch's own CrossEntropyLoss and MultiheadAttention,
    and libraries that call ``torch.nn.functional.scaled_dot_product_attention``; code that imported the function
    itself (``from torch.nn.functional import cross_entropy``) before the call keeps torch's. Calls whose tensors
    are nested, sparse or subclasses (DTensor) still go to what the name was bound to (torch's function, or another
    library's patch of it). ``backend`` is preferred for every
    routed call, as in ``pykernels.use_backend``: a call it cannot run falls back to the next backend, visibly in
    ``pykernels.last_dispatch``. None: automatic, which hands a call to torch's own kernel where that measured
    faster (``last_dispatch`` then says "torch" and why)."""
    chosen = list(FUNCTIONALS) if names is None else [names] if isinstance(names, str) else list(names)
    unknown = [n for n in chosen if n not in FUNCTIONALS]
    if unknown:
        raise ValueError(f"patch_functional: names {unknown} are not among {sorted(FUNCTIONALS)}")
    if backend is not None:
        backends._check_name(backend)
    bound = {}
    with _open_lock:
        for name in dict.fromkeys(chosen):
            previous = getattr(F, name)
            bound[name] = _Bound(_route(FUNCTIONALS[name], previous, backend), previous)
            _open.setdefault(name, []).append(bound[name])
            setattr(F, name, bound[name].routed)
    backends.logger.info("patch_functional: torch.nn.functional.%s now run pykernels (backend %s)",
                         ", ".join(bound), backend or "automatic")
    return FunctionalPatch(bound)
