"""Scalar and dtype arguments as torch's argument parser and kernels take them, shared by the functional ops: a
wrong one is refused with an error naming it, before any comparison raises a bare TypeError naming none."""
from __future__ import annotations

import numbers
import operator

import torch
from torch import Tensor

from ..errors import ArgumentDtypeError, ArgumentTypeError

# The floating dtypes torch's kernels for these ops compute in: float8 and the other narrow types have no
# softmax / matmul there (torch raises NotImplementedError), so no backend may run them either.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_index(x) -> bool:
    """An integer as torch's parser takes it (int, numpy integers, SymInt: anything with __index__), not a bool (an
    int to operator.index, not to torch's parser) and not a float."""
    if isinstance(x, bool):
        return False
    # (operator.index would specialise a symbolic int: a guard on its value. Dynamo shows a dynamic int as an int)
    if isinstance(x, (int, torch.SymInt)):
        return True
    try:
        operator.index(x)
    except TypeError:
        return False
    return True


def index(x):
    """An ``is_index`` argument as an int (numpy integers converted), a SymInt kept symbolic."""
    return x if isinstance(x, (int, torch.SymInt)) else operator.index(x)


def real(x):
    """torch's argument parser takes any real scalar for a float argument (numpy scalars and bools, 0-dim tensors of
    any real or bool dtype that need no gradient, complex ones with no imaginary part): a Python float for those;
    anything else is left for the checks to name."""
    if x is None or isinstance(x, (int, float)):
        return x
    if isinstance(x, Tensor):
        if x.dim() != 0 or x.requires_grad or x.dtype.is_complex and x.imag != 0:
            return x
        return float(x.real if x.dtype.is_complex else x)
    if isinstance(x, numbers.Real) or type(x).__module__ == "numpy" and type(x).__name__ in ("bool", "bool_"):
        return float(x)
    return x


def check_real(fn: str, name: str, x, what: str = "a float"):
    """``x`` as torch's parser takes a float argument (see ``real``; a bool too, as torch); else an
    ArgumentTypeError naming ``name``. (A SymFloat or SymInt: what torch.compile traces for a dynamic scalar.)"""
    if isinstance(x, (int, float)):  # the usual arguments: no numbers.Real ABC check (a Python call per check)
        return x
    x = real(x)
    if not isinstance(x, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise ArgumentTypeError(f"{fn}: {name} must be {what}, got {type(x).__name__}")
    return x


def check_bool(fn: str, name: str, x, optional: bool = False) -> None:
    """torch's parser: a bool (or None where ``optional``), not anything truthy ("no" would be True)."""
    if not (isinstance(x, (bool, torch.SymBool)) or optional and x is None):
        raise ArgumentTypeError(f"{fn}: {name} must be a bool{' or None' if optional else ''}, got "
                                f"{type(x).__module__}.{type(x).__name__}")


def check_float_dtype(fn: str, name: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ArgumentDtypeError(f"{fn}: {name} must be floating point (float16, bfloat16, float32 or float64), got "
                                 f"{t.dtype}")
