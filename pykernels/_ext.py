"""Loading of the compiled extension ``pykernels._C``.

Importing pykernels never fails because of the extension: when ``_C`` is missing, was built for another
torch, or fails to load, the reason is kept here and reported by ``pykernels.available_backends()``; the
Triton and reference backends keep working.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import json
import logging
import os
import platform
from pathlib import Path
from typing import Optional, Tuple

import torch

from . import _cpuinfo, _native
from ._device_props import constant_under_compile

_BUILD_INFO_PATH = Path(__file__).with_name("_build_info.json")

build_info: dict = {}
load_error: Optional[str] = None  # why _C is unusable, or None when loaded
_loaded = False
# The ISA the C++ CPU kernels run at: "AVX512" where _C_avx512's kernels are registered into _C, else _C's build
# capability ("AVX2" or "DEFAULT"); None without _C. wide_error: why _C_avx512 is not in use, or None.
cpu_kernels: Optional[str] = None
wide_error: Optional[str] = None
# the entry points of a wide library, each registered into _C by its name
_WIDE_KERNELS = ("cross_entropy_rows", "lstm_layer_fwd", "lstm_layer_bwd")


def _torch_base(version: str) -> str:
    return version.split("+")[0]


def _libraries(this_python_only: bool = False, name: str = "_C") -> list:
    """The library files called name next to this module: any, or only those this interpreter would import."""
    # (".*.so": "_C*.so" would also match _C_avx512's files)
    suffixes = importlib.machinery.EXTENSION_SUFFIXES if this_python_only else (".so", ".*.so", ".pyd", ".*.pyd")
    return [p for s in suffixes for p in _BUILD_INFO_PATH.parent.glob(name + s)]


def _wide_reason() -> Optional[str]:
    """Why _C_avx512's kernels cannot run here, or None. torch's own dispatch level decides, so that
    ATEN_CPU_CAPABILITY=avx2 (or default) lowers ours with torch's."""
    if os.environ.get("PYKERNELS_DISABLE_AVX512") == "1":
        return "disabled by PYKERNELS_DISABLE_AVX512=1"
    if "avx512" not in build_info.get("wide_cpu_libraries", []):
        return "this build has no _C_avx512 (built on a CPU other than x86-64, or before it existed)"
    if not _cpuinfo.has_avx512():
        return "this CPU lacks AVX-512 (F, BW, VL, DQ)"
    if _native.CPU_CAPABILITY != "AVX512":
        return (f"torch dispatches its CPU kernels at {_native.CPU_CAPABILITY} here (ATEN_CPU_CAPABILITY), "
                "ours follow it")
    if not _libraries(this_python_only=True, name="_C_avx512"):
        return "_C_avx512 is listed in the build record but its library is missing; rebuild"
    return None


def _main_library() -> ctypes.CDLL:
    """_C through ctypes (the library already loaded: the same handle, its initialisers do not run again)."""
    from . import _C
    main = ctypes.CDLL(_C.__file__)
    main.pykernels_set_wide_kernel.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    main.pykernels_wide_kernel.argtypes = [ctypes.c_char_p]
    main.pykernels_wide_kernel.restype = ctypes.c_void_p
    return main


def set_wide_kernels(on: bool) -> Optional[str]:
    """Registers _C_avx512's kernels into _C (on) or takes them out (off: _C's own run); returns why they are not
    registered, or None. Runs once at import; tests call it to run the CPU kernels at both levels."""
    global cpu_kernels, wide_error
    if not _loaded:
        return load_error
    why = _wide_reason() if on else "switched off (pykernels._ext.set_wide_kernels)"
    try:
        main = _main_library()
        fns = dict.fromkeys(_WIDE_KERNELS)
        if why is None:
            # RTLD_LOCAL (ctypes' default): the library's AVX-512 copies of inline functions (std::, c10::) stay
            # visible to no other library, so no code outside its own kernels can end up running them
            wide = ctypes.CDLL(str(_libraries(this_python_only=True, name="_C_avx512")[0]),
                               mode=os.RTLD_LOCAL | os.RTLD_NOW)  # (whatever sys.setdlopenflags says)
            if wide.pykernels_wide_kernels_abi() != main.pykernels_wide_kernels_abi():
                why = "_C_avx512 is from another build than _C (their argument layouts differ); rebuild"
            else:
                fns = {name: ctypes.cast(getattr(wide, "pykernels_" + name), ctypes.c_void_p) for name in fns}
        for name, fn in fns.items():
            if main.pykernels_set_wide_kernel(name.encode(), fn) != 0:
                raise AttributeError(f"_C has no slot for {name}")
    except (OSError, AttributeError) as e:  # a stale library: _C's own kernels run, the import goes on
        why = f"_C_avx512 could not be registered into _C ({e}); rebuild"
    cpu_kernels = "AVX512" if why is None else "AVX2" if build_info.get("cpu_capability") == "avx2" else "DEFAULT"
    wide_error = why
    logging.getLogger("pykernels").debug("C++ CPU kernels run at %s%s", cpu_kernels, f" ({why})" if why else "")
    return why


def wide_kernel(name: str) -> Optional[int]:
    """The address of the wide kernel registered into _C under name, or None: _C's own runs."""
    return _main_library().pykernels_wide_kernel(name.encode()) if _loaded else None


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
    set_wide_kernels(True)


def loaded() -> bool:
    return _loaded


def has_cuda_kernels() -> bool:
    """True when _C was compiled with its CUDA kernels."""
    return _loaded and bool(build_info.get("with_cuda"))


@constant_under_compile  # (Dynamo would warn tracing the lru_cache below; the answer is a constant of a graph)
def cuda_arch_reason(major: int, minor: int) -> Optional[str]:
    """Why _C's CUDA kernels cannot launch on a GPU of compute capability major.minor (None: they can). The build's
    TORCH_CUDA_ARCH_LIST entries: "X.Y" is machine code that runs on X.Z for Z >= Y, "X.Ya" on X.Y only, "+PTX"
    adds code the driver compiles for any later GPU. Without a match a launch fails with "no kernel image is
    available" instead of taking the next backend. Asked at every dispatch of a CUDA call: the answer is cached."""
    return _arch_reason(major, minor, tuple(build_info.get("arch_list") or ()))


@functools.lru_cache(maxsize=None)
def _arch_reason(major: int, minor: int, archs: Tuple[str, ...]) -> Optional[str]:
    if (major, minor) < (8, 0):  # no arch list helps: the kernels use bf16 mma.sync, cp.async and ldmatrix
        return f"the CUDA kernels need compute capability 8.0 or newer, not compute capability {major}.{minor}"
    for a in archs:
        ptx, num = a.endswith("+PTX"), a.replace("+PTX", "")
        specific = num.endswith("a")
        try:
            x, y = (int(v) for v in num.rstrip("a").split("."))
        except ValueError:
            return None  # an entry this check cannot read: let the launch decide
        if (major, minor) == (x, y) or (not specific and major == x and minor >= y) or \
                (ptx and not specific and (major, minor) >= (x, y)):  # (an "a" target's PTX runs on it alone)
            return None
    return (f"pykernels._C has no CUDA code for compute capability {major}.{minor} (built for "
            f"{', '.join(archs) or 'no architecture'}): rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor}")


_load()
