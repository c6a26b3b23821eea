"""Loading of the compiled extension ``pykernels._C``.

Importing pykernels never fails because of the extension: when ``_C`` is missing, was built for another
torch, or fails to load, the reason is kept here and reported by ``pykernels.available_backends()``; the
Triton and reference backends keep working.
"""
from __future__ import annotations

import importlib.machinery
import json
import os
import platform
from pathlib import Path
from typing import Optional

import torch

from . import _cpuinfo

_BUILD_INFO_PATH = Path(__file__).with_name("_build_info.json")

build_info: dict = {}
load_error: Optional[str] = None  # why _C is unusable, or None when loaded
_loaded = False


def _torch_base(version: str) -> str:
    return version.split("+")[0]


def _libraries(this_python_only: bool = False) -> list:
    """The _C library files next to this module: any, or only those this interpreter would import."""
    suffixes = importlib.machinery.EXTENSION_SUFFIXES if this_python_only else ("*.so", "*.pyd")
    return [p for s in suffixes for p in _BUILD_INFO_PATH.parent.glob("_C" + s)]


def _load() -> None:
    global build_info, load_error, _loaded
    if os.environ.get("PYKERNELS_DISABLE_EXTENSION") == "1":
        load_error = "disabled by PYKERNELS_DISABLE_EXTENSION=1"
        return
    rebuild = "rebuild with `pip install --no-build-isolation -e .`"
    if _BUILD_INFO_PATH.exists():
        try:
            info = json.loads(_BUILD_INFO_PATH.read_text())
        except (OSError, ValueError) as e:  # a damaged file must not break the import
            load_error = f"unreadable {_BUILD_INFO_PATH.name}: {e}; {rebuild}"
            return
        if not isinstance(info, dict):
            load_error = f"damaged {_BUILD_INFO_PATH.name} (not a JSON object); {rebuild}"
            return
        build_info = info
    elif _libraries():
        load_error = f"pykernels._C has no {_BUILD_INFO_PATH.name} (its build record: torch version, arches); {rebuild}"
        return
    else:
        load_error = "pykernels._C is not built (no _build_info.json); run `pip install --no-build-isolation -e .`"
        return
    built_py, running_py = str(build_info.get("python", "")), platform.python_version()
    if built_py and built_py.split(".")[:2] != running_py.split(".")[:2]:
        load_error = f"pykernels._C was built for Python {built_py} but Python {running_py} is running; {rebuild}"
        return
    built_for = build_info.get("torch_version", "?")
    if _torch_base(built_for) != _torch_base(torch.__version__):
        # Loading a .so built against another libtorch ABI can crash the process: refuse it up front.
        load_error = (f"pykernels._C was built for torch {built_for} but torch {torch.__version__} is running; "
                      "rebuild with `pip install --no-build-isolation -e .`")
        return
    if build_info.get("cpu_capability") == "avx2" and not _cpuinfo.has_avx2():
        load_error = "pykernels._C was built with AVX2 but this CPU lacks it; rebuild here"
        return
    if not _libraries(this_python_only=True):
        # Else `from . import _C` fails with Python's "partially initialized module (circular import)" text.
        load_error = (f"pykernels._C is not built: {_BUILD_INFO_PATH.name} is there but no _C library for this "
                      f"Python (_C{importlib.machinery.EXTENSION_SUFFIXES[0]}); {rebuild}")
        return
    try:
        from . import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)
    except ImportError as e:
        load_error = f"pykernels._C failed to load: {e}; {rebuild}"
        return
    _loaded = True


def loaded() -> bool:
    return _loaded


def has_cuda_kernels() -> bool:
    """True when _C was compiled with its CUDA kernels."""
    return _loaded and bool(build_info.get("with_cuda"))


_load()
