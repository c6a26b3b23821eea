"""Backend selection: which implementation runs an op.

Order of precedence for one call:
1. ``backend=`` passed to the function: a hard request. If that backend cannot run this call, a
   ``BackendUnavailableError`` says why (nothing silently runs elsewhere). An empty call, which needs no kernel, is
   the exception: the reference answers it, recorded in ``last_dispatch`` (see ``choose``).
2. ``pykernels.use_backend(name)`` (context manager) or env ``PYKERNELS_BACKEND``: a preference. If the
   preferred backend cannot run the call, the next one in the device's chain runs it, and the fallback is
   logged on the ``pykernels`` logger (DEBUG) and recorded in ``pykernels.last_dispatch``.
3. Automatic: the first backend of the device's chain that supports the call (chains are ordered by
   measured speed, see bench/results/). Where every pykernels backend of an op measured slower on a device than
   torch's own kernel (``NATIVE_FASTER``), an automatic call that torch can express runs torch's kernel instead:
   the drop-in must never make a model slower. ``last_dispatch`` then records ("torch", {why}); a ``backend=``
   request or a preference still runs ours; PYKERNELS_PREFER_NATIVE=0 turns the rule off.
"""
from __future__ import annotations

import contextlib
import functools
import glob
import importlib
import logging
import os
import sys
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch

from . import _ext, _native
from .errors import ArgumentValueError

BACKENDS = ("triton", "cuda", "cpu", "reference")

logger = logging.getLogger("pykernels")

# op name -> (backend that ran, {backend skipped: why}); the last eager call of each op, for users and tests. One
# record for the process: with several threads calling an op, the last call of any of them.
last_dispatch: Dict[str, tuple] = {}


def _record(op: str, entry: tuple) -> None:
    """last_dispatch[op] = entry, outside torch.compile only: a traced write happens once, at trace time (not per
    call), and Dynamo guarded the first graph on the dict being empty, so that graph compiled twice."""
    if not torch.compiler.is_compiling():
        last_dispatch[op] = entry

# The open use_backend blocks, the last one in force. A plain list rather than a ContextVar: torch.compile (dynamo)
# traces through reads of module globals and guards on them (on the names read, not on the entries' identity); and
# one for the process, not per thread or task, since autograd runs a backward (and a checkpoint's recomputation in
# it) on its own worker threads.
_preferred: list = []


class _Preference:
    """One block's entry of ``_preferred``. Equal only to itself, so ``_preferred.remove(entry)`` (atomic) takes
    that block's own entry: two threads' (or asyncio tasks') blocks that overlap without nesting must leave the open
    one's preference in force, not the last one pushed."""
    __slots__ = ("name",)

    def __init__(self, name: Optional[str]):
        self.name = name

    def __repr__(self) -> str:
        return f"use_backend({self.name!r})"


def _push(name: Optional[str]) -> _Preference:
    """Put ``name`` in force until ``_preferred.remove`` of the entry returned."""
    entry = _Preference(name)
    _preferred.append(entry)
    return entry


def preferred() -> Optional[str]:
    """The backend preferred by the innermost open ``use_backend`` block (None: none, or automatic)."""
    top = _preferred[-1:]  # one read: another thread may empty the list between a test and an index
    return top[0].name if top else None


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call; the message says why."""


def backend_name(name: Optional[str]) -> Optional[str]:
    """``name`` checked (None: automatic): the modules' and patch()'s ``backend=``, so a typo fails where it is
    written, not at the first forward."""
    return None if name is None else _check_name(name)


def _check_name(name: str, where: str = "backend") -> str:
    if name not in BACKENDS:
        raise ArgumentValueError(f"{where} must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Prefer ``name`` for pykernels ops inside the block (None: automatic). Process-wide: calls of every thread see
    the innermost open block, and each block removes its own preference when it exits."""
    entry = _push(None if name is None else _check_name(name))
    try:
        yield
    finally:
        _preferred.remove(entry)


def checkpoint_context() -> tuple:
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False,
    context_fn=pykernels.checkpoint_context)``: the recomputation in the backward runs under the backend preference
    that the forward ran under (``use_backend``'s innermost open block, or none), as torch restores autocast's
    state for it. Without it, a ``use_backend`` block around the forward only leaves the recomputation to another
    backend, whose saved tensors differ (``CheckpointError``) or whose gradients belong to another computation.
    Called at the forward: returns (a no-op context for the forward, one re-entering its preference)."""
    return contextlib.nullcontext(), use_backend(preferred())


def _triton_reason() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising anything
        return f"triton is not importable: {e}"
    return None


_ENV_KEYS: Dict[str, object] = {}  # variable name -> os.environ's encoded key (getenv)


def getenv(name: str) -> Optional[str]:
    """``os.environ.get(name)``, still read at every call (the README's rule for the library's variables), at a dict
    lookup's cost: os.environ.get of an unset variable, the usual case, encodes the key and raises and catches a
    KeyError (1 us on 2 cores, 2-3 reads an automatic call). CPython's os.environ keeps the encoded variables in its
    ``_data`` dict, which its own setters (``os.environ[k] = v``, ``monkeypatch.setenv``, ``del``) update: read
    there. Under torch.compile, or if os.environ was replaced by another mapping, os.environ.get (dynamo traces it)."""
    environ = os.environ
    if torch.compiler.is_compiling() or type(environ) is not os._Environ:
        return environ.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = environ.encodekey(name)
    raw = environ._data.get(key)
    return None if raw is None else environ.decodevalue(raw)


def triton_interpreted() -> bool:
    return getenv("TRITON_INTERPRET") == "1"


def interpreted_dot_reason(backend: str, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """Why ``backend``'s kernels with a tl.dot cannot run a call (None: they can): Triton's interpreter multiplies
    bfloat16 operands' raw bit patterns (triton-lang/triton#11584; TOOLCHAIN.md), so bf16 CPU tensors go elsewhere."""
    if backend == "triton" and dtype == torch.bfloat16 and device.type == "cpu" and triton_interpreted():
        return "the Triton interpreter computes bfloat16 tl.dot wrongly (triton-lang/triton#11584)"
    return None


# Files of a GPU driver (NVIDIA's device nodes or proc entry, AMD ROCm's, WSL2's), glob patterns: looked for instead
# of asking torch.cuda.is_available(), which initialises CUDA (cuInit) and so would make every importing process
# unsafe to fork. PYKERNELS_REGISTER_TRITON=1 registers the Triton ops regardless.
_GPU_NODES = ("/dev/nvidia*", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")
_triton_unregistered: Optional[str] = None  # why triton_kernel_modules skipped the ops at import (None: it did not)
_registration_seen = False
# Whether TRITON_INTERPRET was 1 when the Triton kernel modules were first imported (None: not imported): triton.jit
# fixes interpreted or compiled mode as it decorates a kernel, so the variable set later does not reach them.
_triton_imported_interpreted: Optional[bool] = None
# Kernel modules that failed to import although triton itself imports (a triton too old or broken for them), with
# the error: those ops run without Triton, and available_backends() says so.
_triton_import_errors: Dict[str, str] = {}


def triton_kernel_modules(*names: str) -> tuple:
    """(the modules pykernels.triton.<name>, None), or (None, why the Triton ops of an ops module are not
    registered). Where no GPU can exist and the interpreter is off, the Triton backend cannot run a single call,
    and registering its ops would cost every ``import pykernels`` over a second (torch.library.triton_op imports
    torch._inductor): they are skipped there, and available_backends() says why."""
    global _triton_unregistered, _registration_seen, _triton_imported_interpreted
    first, _registration_seen = not _registration_seen, True
    if not triton_interpreted() and os.environ.get("PYKERNELS_REGISTER_TRITON") != "1":
        where = None
        if torch.version.cuda is None and torch.version.hip is None:
            where = "torch is a CPU-only build"
        elif sys.platform.startswith("linux") and not any(glob.glob(p) for p in _GPU_NODES):
            where = "this machine has no GPU (none of " + ", ".join(_GPU_NODES) + ")"
        if where:
            why = (f"the Triton ops are not registered: {where} and TRITON_INTERPRET was not 1 at import "
                   "(registering them imports torch._inductor, over a second; PYKERNELS_REGISTER_TRITON=1 "
                   "registers them anyway)")
            if first:  # the ops modules' calls at `import pykernels` (the same environment for all), not later ones
                _triton_unregistered = why
            return None, why
    if _triton_imported_interpreted is None:
        _triton_imported_interpreted = triton_interpreted()
    mods = []
    for name in names:
        module = f"pykernels.triton.{name}"
        try:
            mods.append(importlib.import_module(module))
        except Exception as e:  # no triton, or a triton too old for the kernels
            why = f"{type(e).__name__}: {e}"
            if _triton_reason() is None:  # without triton at all, _triton_reason says so, and that is no surprise
                if not _triton_import_errors:
                    logger.warning("%s failed to import, so its ops run without the triton backend: %s", module, why)
                _triton_import_errors[module] = why
            return None, why
    return mods, None


def _device_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device`` at all (None: it can)."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"the cpu backend runs on CPU tensors, got {device.type}"
        return None if _ext.loaded() else _ext.load_error
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device.type}"
        if not _ext.loaded():
            return _ext.load_error
        if not _ext.has_cuda_kernels():
            return "pykernels._C was built without CUDA kernels"
        return _ext.cuda_arch_reason(*torch.cuda.get_device_capability(device))
    if backend != "triton":  # (every entry point checks the name first: a new backend must get its branch here)
        raise ValueError(f"unknown backend {backend!r}")
    reason = _triton_reason()
    if reason:
        return reason
    if device.type == "cuda":
        if _triton_unregistered:
            return _triton_unregistered
        major, _ = torch.cuda.get_device_capability(device)
        return None if major >= 8 else f"triton kernels need compute capability >= 8.0, got {major}.x"
    if device.type == "cpu":
        if not triton_interpreted():
            return "triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if _triton_imported_interpreted is False:
            return ("TRITON_INTERPRET=1 was set after the Triton kernels were imported: they were compiled for the GPU "
                    "(set it before `import pykernels`)")
        return _triton_unregistered or _interpreter_reason()  # (TRITON_INTERPRET=1 set after the import)
    return f"triton does not run on {device.type}"


@functools.lru_cache(maxsize=None)
def _interpreter_reason() -> Optional[str]:
    """Triton < 3.7's interpreter converts 1-element arrays with int() (e.g. a loop bound taken from a tensor),
    which numpy >= 2.4 refuses: every kernel then fails with an InterpreterError (seen with triton 3.6)."""
    import re

    import numpy
    import triton

    def version(v: str) -> tuple:
        m = re.match(r"(\d+)\.(\d+)", v)
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} (int() of a "
                "1-element array): use triton >= 3.7 or numpy < 2.4")
    return None


# Ops whose automatic CUDA calls try Triton before our CUDA kernels, and why. The CUDA kernels of these ops passed
# the GPU tier on an H200 (2026-12-04) but measured 2-10x slower than the Triton ones; an op leaves this table when
# a committed benchmark ranks its CUDA kernels first.
TRITON_FIRST_CUDA: Dict[str, str] = {
    "scaled_dot_product_attention":
        "the CUDA kernels measured 0.33x the Triton ones' speed forward+backward (0.09x forward) on H200 bf16, "
        "B=4 H=16 L=2048 E=128 causal (bench/results/h200-attention-linear_cross_entropy-lstm-quick-20261204.json)",
    "varlen_attention": "the kernels of scaled_dot_product_attention, with offsets: as measured there",
    "lstm": "the CUDA persistent kernels measured 0.25x the Triton ones' speed forward+backward (0.42x forward) on "
            "H200 bf16, T=256 B=32 I=H=512 "
            "(bench/results/h200-attention-linear_cross_entropy-lstm-quick-20261204.json)",
    "linear_cross_entropy":
        "the CUDA kernels measured 0.49x the Triton ones' speed forward+backward (0.40x forward) on H200 bf16, "
        "N=8192 H=2048 V=128256 (bench/results/h200-attention-linear_cross_entropy-lstm-quick-20261204.json)",
    "linear_cross_entropy_vocab_parallel": "the kernels of linear_cross_entropy: as measured there",
}


def _chain(device: torch.device, op: str = "") -> Sequence[str]:
    if device.type == "cuda":
        return ("triton", "cuda", "reference") if op in TRITON_FIRST_CUDA else ("cuda", "triton", "reference")
    if device.type == "cpu":
        return ("cpu", "reference")
    return ("reference",)


def available_backends(device: Optional[torch.device | str] = None) -> Dict[str, Optional[str]]:
    """Each backend -> None when usable on ``device`` (default: cuda if present, else cpu), else the reason."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():  # asked here, not per call: a CUDA tensor proves it
        return {b: None if b == "reference" else "no CUDA device here (torch.cuda.is_available() is False)"
                for b in BACKENDS}
    out = {b: _device_reason(b, device) for b in BACKENDS}
    if out["triton"] is None and _triton_import_errors:
        # (reported here, not by _device_reason: a call's dispatch goes by its own op's kernel module, which each
        # ops module checks through its triton_import_error; one broken module must not switch off the others)
        by_error: Dict[str, list] = {}
        for module, why in _triton_import_errors.items():
            by_error.setdefault(why, []).append(module)
        out["triton"] = "pykernels' Triton kernels failed to import: " + "; ".join(
            f"{', '.join(modules)}: {why}" for why, modules in by_error.items())
    return out


# op -> {device type: why torch's own kernel runs automatic calls there}. Measured, never assumed: each entry
# cites the benchmark that put it here and goes when ours wins.
NATIVE_FASTER: Dict[str, Dict[str, str]] = {
    "scaled_dot_product_attention": {
        "cuda": "torch's SDPA (FlashAttention-2/cuDNN) measured 1.4-5.4x faster than the Triton kernels on H100 "
                "bf16 (bench/results/h100-attention-lstm-lce-20261122.jsonl), and cuDNN's 3.3x forward+backward "
                "(1.6x forward) on H200 bf16 at B=4 H=16 L=2048 E=128 causal "
                "(bench/results/h200-attention-linear_cross_entropy-lstm-quick-20261204.json)",
        "cpu": "torch's SDPA measured 1.9-2.1x faster than the reference forward+backward (2.9-3.5x forward; there "
               "is no C++ CPU attention kernel) on 2 cores fp32 "
               "(bench/results/"
               "cpu-cross_entropy-linear_cross_entropy-attention-lstm-lstm_cell-e2e-20261205-080559.json)"},
    "lstm": {
        "cuda": "cuDNN measured 4-48x faster than the Triton row-block sequence kernel on H100 fp32 "
                "(bench/results/h100-attention-lstm-lce-20261122.jsonl); its split persistent successor (H > 64) "
                "measured 1.89x cuDNN's speed forward on H200 bf16 at T=256 B=32 I=H=512 "
                "(bench/results/h200-attention-linear_cross_entropy-lstm-quick-20261204.json; cuDNN's time moved "
                "between runs), one shape and no forward+backward comparison (that run's cuDNN baseline failed), "
                "too little to route models to it",
        "cpu": "torch's oneDNN LSTM measured faster than the persistent C++ sequence kernel on 2 AVX-512 cores fp32 "
               "at T=64, B=16-64, H=128-256: ours at 0.78-0.88x its speed forward, 0.84-0.93x forward+backward; "
               "ours wins only at B=1 (1.07x with a gradient, 0.98x forward) "
               "(bench/results/"
               "cpu-cross_entropy-linear_cross_entropy-attention-lstm-lstm_cell-e2e-20261205-080559.json)"},
}


# op -> {device type: {input dtype: why, or (size with a gradient, size without, why)}}: exceptions to
# NATIVE_FASTER, dtypes in which ours measured faster; sized, only for calls of at most that size (the op's own
# measure: batch rows for lstm and lstm_cell; 0: no non-empty batch).
OURS_FASTER_DTYPE: Dict[str, Dict[str, Dict[torch.dtype, object]]] = {
    "lstm": {"cpu": {
        torch.float32: (4, 4, "with the recurrence built for AVX-512 (pykernels._C_avx512, 6-row tiles), on a 2-core "
                              "Intel Xeon, T=64: forward+backward 1.43-1.61x oneDNN's speed at B=1 (1.35-1.96x at "
                              "H=256-1024 in the other runs), 1.23-1.44x at B=2, 1.08-1.41x at B=4, but 0.91-1.06x "
                              "at B=8 (H=128-1024), 0.74-1.10x at B=16-64; the forward alone 1.01-1.36x at B=1, "
                              "1.34-1.98x at B=2, 1.07-1.22x at B=4, 0.88-1.42x at B=8, 0.77-1.02x at B=16-64 "
                              "(bench/results/cpu-lstm-small-batch-20261206-150110.json, "
                              "bench/results/cpu-lstm-20261206-150151.json, "
                              "bench/results/cpu-lstm-B16-20261206-150208.json, "
                              "bench/results/cpu-lstm-B16-H512-20261206-150228.json, "
                              "bench/results/cpu-lstm-B32-20261206-150247.json, "
                              "bench/results/cpu-lstm-large-hidden-20261206-150446.json)"),
        torch.bfloat16: (8, 0, "with the recurrence built for AVX-512 the C++ sequence kernel (fp32 gates and GEMMs "
                               "on converted operands) measured faster than oneDNN's bf16 LSTM (AMX) up to B=8 with a "
                               "gradient, 2-core Intel Xeon, T=64: forward+backward 2.73-3.68x at B=1, 2.21-3.19x at "
                               "B=2, 1.83-2.64x at B=4, 1.02-1.65x at B=8 (H=128-512), 0.93x at B=16 and 0.71x at "
                               "B=64; the forward alone 0.53-1.02x at B=1, so calls without a gradient stay torch's "
                               "(bench/results/cpu-lstm-bfloat16-small-batch-20261206-150635.json, "
                               "bench/results/cpu-lstm-bfloat16-20261206-150709.json)"),
        torch.float16: (32, 8, "where oneDNN has fp16 (AVX512-FP16, a 2-core Intel Xeon; elsewhere "
                               "OURS_WITHOUT_ONEDNN) torch's fp16 LSTM runs it, and the C++ sequence kernel built for "
                               "AVX-512 (fp32 GEMMs on converted operands) measured, at T=64, with a gradient "
                               "1.82-11.5x its speed up to B=8 (H=128-512), 1.50-2.59x at B=16, 1.25x / 1.52x at "
                               "B=32 (H=768 / 256), 1.10x / 0.91x at B=64 (H=256 / 512); without a gradient "
                               "1.14-3.77x up to B=8, 0.93-1.04x at B=16, 0.72-1.00x at B=32 and 0.54-0.80x at B=64 "
                               "(bench/results/cpu-lstm-float16-small-batch-20261206-150911.json, "
                               "bench/results/cpu-lstm-float16-20261206-150950.json, "
                               "bench/results/cpu-lstm-float16-B16-20261206-151144.json, "
                               "bench/results/cpu-lstm-float16-B16-H512-20261206-151209.json, "
                               "bench/results/cpu-lstm-float16-B32-20261206-151016.json, "
                               "bench/results/cpu-lstm-float16-B32-H768-20261206-151052.json, "
                               "bench/results/cpu-lstm-float16-B64-H512-20261206-151122.json)")}},
}


# As OURS_FASTER_DTYPE, where torch dispatches at AVX512 but our CPU kernels run as built into _C, for AVX2
# (``_ext.cpu_kernels != "AVX512"``: PYKERNELS_DISABLE_AVX512=1, a build without _C_avx512, and every measurement
# before the recurrence joined _C_avx512): an entry here replaces that dtype's entry there.
OURS_FASTER_DTYPE_OURS_AVX2: Dict[str, Dict[str, Dict[torch.dtype, object]]] = {
    "lstm": {"cpu": {
        torch.float32: (2, 0, "the persistent C++ sequence kernel measured faster than oneDNN's for one or two "
                              "sequences with a gradient, 2 cores, T=64: forward+backward 1.23x, 1.50x, 1.09x at "
                              "H=128, 256, 512 (B=1), 1.22x, 1.28x, 1.15x (B=2); from B=4 0.91-1.08x; the forward "
                              "alone 0.96-1.23x at B=1 and 0.98-1.27x at B=2, so calls without a gradient stay "
                              "torch's (bench/results/cpu-lstm-small-batch-20261205-083703.json; at B=1 H=256 1.07x "
                              "and 0.98x in bench/results/"
                              "cpu-cross_entropy-linear_cross_entropy-attention-lstm-lstm_cell-e2e-20261205-080559.json,"
                              " where oneDNN's own time was 2.4x lower than in another run the same hour); on an "
                              "Intel Xeon with AVX-512 the same bound: 1.16-1.53x at B=1, 1.00-1.34x at B=2, "
                              "0.88-1.24x at B=4, 0.80-0.90x at B=8 with a gradient "
                              "(bench/results/cpu-lstm-small-batch-20261206-101028.json)"),
        torch.bfloat16: (4, 0, "with a gradient the C++ sequence kernel (fp32 gates and GEMMs on converted operands) "
                               "measured faster than oneDNN's bf16 LSTM up to B=4, 2 cores, T=64: forward+backward "
                               "1.79-3.15x at B=1, 1.67-2.41x at B=2, 1.10-1.42x at B=4, 0.78-1.07x at B=8 "
                               "(H=128-512); "
                               "the forward alone 0.58-1.22x, so calls without a gradient stay torch's "
                               "(bench/results/cpu-lstm-bfloat16-small-batch-20261205-083823.json; at B=16-64 "
                               "0.49-0.81x, bench/results/cpu-lstm-bfloat16-20261205-080626.json); on an Intel "
                               "Xeon with AMX the same bound: 2.07-3.17x at B=1, 1.42-2.54x at B=2, 1.06-2.01x at B=4, "
                               "0.78-1.31x at B=8 (bench/results/cpu-lstm-bfloat16-small-batch-20261206-101153.json)"),
        torch.float16: (16, 8, "where oneDNN has fp16 (AVX512-FP16, a 2-core Intel Xeon; elsewhere "
                               "OURS_WITHOUT_ONEDNN) torch's fp16 LSTM runs it, and the C++ sequence kernel (fp32 "
                               "GEMMs on converted operands) measured, at T=64, with a gradient 1.24-9.95x its speed "
                               "up to B=8 (H=128-1024) and 1.14-2.89x at B=16 (H=128-768), but 0.92x / 1.16x at "
                               "B=32 (H=768 / 256) and 0.78-1.06x at B=64; without a gradient 1.35-3.50x up to B=4, "
                               "0.99-1.40x at B=8, 0.71-0.90x at B=16 and 0.49-0.62x at B=64 "
                               "(bench/results/cpu-lstm-lstm_cell-linear_cross_entropy-float16-20261206-093147.json, "
                               "bench/results/cpu-lstm-float16-small-batch-20261206-093447.json, "
                               "bench/results/cpu-lstm-float16-large-hidden-20261206-093915.json, "
                               "bench/results/cpu-lstm-float16-B16-20261206-094113.json, "
                               "bench/results/cpu-lstm-float16-B32-20261206-094130.json, "
                               "bench/results/cpu-lstm-float16-B16-20261206-094152.json, "
                               "bench/results/cpu-lstm-float16-B32-20261206-094216.json)")}},
}


# op -> {16-bit dtype: why}: on a CPU whose oneDNN lacks that dtype (``_native.ONEDNN_DTYPES``: bf16 needs AVX512-BF16
# or AMX, fp16 AVX512-FP16 or AMX-FP16)
# torch runs its GEMMs on generic loops (and its LSTM under autocast raises), ours on fp32 GEMMs of converted operands
# (``_native.gemm_dtype``): there ours runs every automatic CPU call of the op in that dtype, ahead of the other
# rules, which were measured where oneDNN had it. Read at each call.
OURS_WITHOUT_ONEDNN: Dict[str, Dict[torch.dtype, str]] = {
    "lstm": {torch.float16: "without oneDNN fp16 (no AVX512-FP16 / AMX-FP16: an AMD EPYC with AVX-512, 2 cores) "
                            "torch's CPU LSTM runs fp16 GEMM loops (5-100x slower than its fp32 ones there), ours "
                            "fp32 GEMMs on converted operands: the C++ sequence kernel measured 3.5-7.7x torch's speed "
                            "forward and 5.4-6.2x forward+backward at T=64, B=1-64, H=128-256 "
                            "(bench/results/cpu-lstm-float16-20261205-080843.json), and 4.2-9.6x / 26-50x on an "
                            "AVX2-only one (bench/results/cpu-lstm-float16-avx2-20261205-101214.json)",
             torch.bfloat16: "without oneDNN bf16 torch's CPU LSTM runs bf16 GEMM loops: on an AVX2-only AMD EPYC, "
                             "2 cores, T=64, H=128-512, B=1-64, the C++ sequence kernel (fp32 GEMMs on converted "
                             "operands) measured 3.7-9.9x its speed forward and 13.6-60x forward+backward (torch's "
                             "own bf16 gradients at H=256, B=2-8 missed the harness's tolerance, untimed); at "
                             "H=768-1024, B=1-64 2.9-7.2x forward, 34x and 86x forward+backward where torch's "
                             "gradients passed (B=1 H=768, B=64 H=1024: 1.0 and 129 s a call) "
                             "(bench/results/cpu-lstm-bfloat16-avx2-20261205-095910.json, "
                             "bench/results/cpu-lstm-bfloat16-small-batch-avx2-20261205-100215.json, "
                             "bench/results/cpu-lstm-bfloat16-large-hidden-avx2-20261205-130103.json)"},
    "lstm_cell": {torch.bfloat16: "without oneDNN bf16 torch's CPU cell runs bf16 GEMM loops: on an AVX2-only AMD "
                                  "EPYC, 2 cores, I=H=256, the C++ cell measured 1.56-3.24x its speed forward and "
                                  "4.2-28.7x forward+backward at B=1-64 "
                                  "(bench/results/cpu-lstm_cell-bfloat16-avx2-20261205-095938.json)"},
}


# As OURS_FASTER_DTYPE, on x86 CPUs without AVX-512 (``_native.CPU_CAPABILITY == "AVX2"``), where oneDNN's kernels
# lose their 512-bit vectors and ours (built for AVX2) do not: an entry here replaces that dtype's entry there.
OURS_FASTER_DTYPE_AVX2: Dict[str, Dict[str, Dict[torch.dtype, object]]] = {
    "lstm": {"cpu": {
        torch.float32: (1 << 62, 0, "on an x86 CPU without AVX-512 (a 2-core AVX2 AMD EPYC) the persistent C++ "
                                    "sequence kernel measured 0.98-1.39x oneDNN's speed forward+backward at T=64, "
                                    "B=1-64, H=128-512 (below 1.0 only 0.98x and 0.99x at H=512, B=1 and 8), so "
                                    "calls with a gradient run ours at every batch size; at H=768 and 1024 "
                                    "0.98-1.68x (B=1, 8, 64); the forward alone 0.86-1.72x (0.78-1.24x at "
                                    "H=512-1024), so calls without one stay torch's "
                                    "(bench/results/cpu-lstm-avx2-20261205-101416.json, "
                                    "bench/results/cpu-lstm-small-batch-avx2-20261205-101549.json, "
                                    "bench/results/cpu-lstm-large-hidden-avx2-20261205-121415.json); after the "
                                    "K-blocked weight gradients 0.94-1.60x forward+backward over the same shapes, "
                                    "below 1.0 at 7 of 21, at most 6% "
                                    "(bench/results/cpu-lstm-avx2-k-blocked-20261205-230227.json, "
                                    "bench/results/cpu-lstm-small-batch-avx2-k-blocked-20261205-230335.json, "
                                    "bench/results/cpu-lstm-large-hidden-avx2-k-blocked-20261205-230511.json)")}},
}


# op -> {device type: {input dtype: why, or (size with a gradient, size without, why)}}: as NATIVE_FASTER, for
# calls in one dtype; sized, only for calls of at least that size (the op's own measure: batch rows for lstm_cell).
NATIVE_FASTER_DTYPE: Dict[str, Dict[str, Dict[torch.dtype, object]]] = {
    "lstm_cell": {"cpu": {
        torch.bfloat16: (9, 9, "torch's LSTMCell runs bf16 GEMMs with bf16 gates (oneDNN, AVX512-BF16 here), the C++ "
                            "cell fp32 GEMMs on converted operands (fp32 gates, its contract) beyond its fused passes "
                            "on the bf16 weights (forward up to B=16 since ee5d0c9, backward up to B=8): ours measured "
                            "0.32x torch's speed forward and 0.81x forward+backward at B=64, 0.75x / 1.01x at B=16 "
                            "and 0.92x / 1.07x at B=12, but 1.09x / 1.02x at B=8, 1.56x / 1.26x at B=5, "
                            "1.97x / 1.34x at B=4, 2.68x / 1.80x at B=2 and 2.26x / 1.85x at B=1, I=H=256, 2 cores "
                            "(bench/results/cpu-lstm_cell-bfloat16-20261205-075849.json, "
                            "bench/results/cpu-lstm_cell-bfloat16-B16-20261205-085729.json, "
                            "bench/results/cpu-lstm_cell-bfloat16-B12-20261205-085718.json, "
                            "bench/results/cpu-lstm_cell-bfloat16-B5-20261205-075913.json, "
                            "bench/results/cpu-lstm_cell-bfloat16-B4-20261205-075901.json, "
                            "bench/results/cpu-lstm_cell-bfloat16-B2-20261205-080916.json)")}},
}


# op -> {device type: (size from which ours runs a call with a gradient, size from which it runs one without,
# why)}. Below those sizes (the op's own measure: elements of the logits for cross_entropy) torch's kernel runs
# automatic calls that it can express: there the few small tensor ops around our kernel cost more than torch's
# whole op. Measured, like NATIVE_FASTER.
NATIVE_FASTER_BELOW: Dict[str, Dict[str, tuple]] = {
    "cross_entropy": {
        "cpu": (1 << 20, 1 << 21,
                "torch's cross-entropy measured faster than the C++ kernel on small logits, 2 cores fp32: ours at "
                "0.42x torch's speed at 2^16 with a gradient, 0.69x at 2^18, 1.56-1.80x at 2^20-2^21, 6.9x at 2^27 "
                "on an AMD EPYC with AVX-512 (bench/results/"
                "cpu-cross_entropy-linear_cross_entropy-attention-lstm-lstm_cell-e2e-20261205-080559.json); "
                "without a gradient, with the kernel built for AVX-512 (pykernels._C_avx512) on an Intel Xeon with "
                "AVX-512: 0.79x at 2^19, 0.87-1.10x at 2^20 (three shapes), 1.17x at 2^21, 1.40-1.44x at 2^22, "
                "3.74x at 2^27; with a gradient 0.81x at 2^18, 1.33x at 2^19, 1.46-1.81x at 2^20, 4.81x at 2^27 "
                "(bench/results/cpu-cross_entropy-20261206-114401.json, "
                "bench/results/cpu-cross_entropy-20261206-114940.json, "
                "bench/results/cpu-cross_entropy-20261206-115013.json, "
                "bench/results/cpu-cross_entropy-20261206-115042.json, "
                "bench/results/cpu-cross_entropy-20261206-115114.json, "
                "bench/results/cpu-cross_entropy-20261206-115145.json; bf16 and fp16 cross at the same sizes: "
                "0.96x and 0.97x at 2^20, 1.04x and 1.17x at 2^21 without a gradient, 1.46x and 1.66x at 2^20 with "
                "one, bench/results/cpu-cross_entropy-bfloat16-20261206-114708.json, "
                "bench/results/cpu-cross_entropy-float16-20261206-114907.json): forward-only calls run ours from "
                "2^21")},
}


# As NATIVE_FASTER_BELOW, where torch dispatches at AVX512 but our CPU kernels run as built into _C, for AVX2
# (``_ext.cpu_kernels != "AVX512"``: PYKERNELS_DISABLE_AVX512=1, a build without _C_avx512): torch's 512-bit forward
# then wins longer. An entry here replaces the op's entry there.
NATIVE_FASTER_BELOW_OURS_AVX2: Dict[str, Dict[str, tuple]] = {
    "cross_entropy": {
        "cpu": (1 << 20, 1 << 22,
                "torch's cross-entropy measured faster than the C++ kernel on small logits, 2 cores fp32: ours at "
                "0.42x torch's speed at 2^16 with a gradient, 0.69x at 2^18, 1.56-1.80x at 2^20-2^21, 6.9x at 2^27; "
                "without a gradient 0.28x at 2^16, 0.56x at 2^18, 0.98x at 2^20, 1.13x at 2^21, 5.9x at 2^27 on an "
                "AMD EPYC with AVX-512 (bench/results/"
                "cpu-cross_entropy-linear_cross_entropy-attention-lstm-lstm_cell-e2e-20261205-080559.json; an "
                "earlier run of the same kernel, 1.14x at 2^20 without a gradient: bench/results/history/"
                "cpu-cross_entropy-linear_cross_entropy-attention-lstm-lstm_cell-e2e-20261205-052819.json); on an "
                "Intel Xeon with AVX-512, where torch's forward runs 512-bit vectors and ours 256-bit ones, the "
                "same crossover with a gradient (0.67x at 2^18, 1.10x at 2^20, 1.21-1.63x at 2^21-2^22) but a "
                "later one without: 0.70x at 2^20, 0.86x at 2^21, 0.82-0.98x at 2^22, 2.25-3.93x at 2^23 "
                "(bench/results/"
                "cpu-cross_entropy-linear_cross_entropy-attention-lstm-lstm_cell-e2e-20261206-092334.json, "
                "bench/results/cpu-cross_entropy-20261206-093512.json, "
                "bench/results/cpu-cross_entropy-20261206-093537.json, "
                "bench/results/cpu-cross_entropy-20261206-094318.json, "
                "bench/results/cpu-cross_entropy-20261206-094336.json, "
                "bench/results/cpu-cross_entropy-20261206-094357.json, "
                "bench/results/cpu-cross_entropy-20261206-094418.json; again in the hour of the AVX-512 kernel's "
                "runs, with PYKERNELS_DISABLE_AVX512=1: 0.77x at 2^20, 0.87x at 2^21 without a gradient, "
                "bench/results/cpu-cross_entropy-ours-avx2-20261206-114539.json): forward-only calls run ours from "
                "2^22")},
}


# As NATIVE_FASTER_BELOW, on x86 CPUs without AVX-512 (``_native.CPU_CAPABILITY == "AVX2"``), where torch's kernels
# lose their 512-bit vectors and ours (built for AVX2) do not: an entry here replaces the op's entry there.
NATIVE_FASTER_BELOW_AVX2: Dict[str, Dict[str, tuple]] = {
    "cross_entropy": {
        "cpu": (1 << 20, 1 << 20,
                "torch's cross-entropy measured faster than the C++ kernel on small logits on an AVX2-only CPU (a "
                "2-core AMD EPYC), fp32: ours at 0.52x torch's speed at 2^16, 0.93x at 2^18, 2.50x at 2^20, 14.3x "
                "at 2^27 with a gradient, 0.26x, 0.69x, 1.34x, 6.7x without "
                "(bench/results/cpu-cross_entropy-avx2-20261205-104540.json)")},
}


def _cpu_variant(avx2: dict, ours_avx2: dict) -> dict:
    """Of a CPU rule's variant tables, the one measured where this process runs: ``avx2`` on an AVX2-only CPU,
    ``ours_avx2`` where torch dispatches at AVX512 but our CPU kernels run as built into _C; else none ({}: the
    main table holds). An entry of the variant replaces the main table's."""
    if _native.CPU_CAPABILITY == "AVX2":
        return avx2
    if _native.CPU_CAPABILITY == "AVX512" and _ext.cpu_kernels != "AVX512":
        return ours_avx2
    return {}


def ours_faster_dtype(op: str, kind: str, dtype: torch.dtype) -> object:
    """The OURS_FASTER_DTYPE exception of ``op`` in ``dtype`` on device type ``kind`` for this CPU and the ISA our CPU
    kernels run at (as ``native_below``), or None."""
    ours = OURS_FASTER_DTYPE.get(op, {}).get(kind, {}).get(dtype)
    if kind == "cpu":
        variant = _cpu_variant(OURS_FASTER_DTYPE_AVX2, OURS_FASTER_DTYPE_OURS_AVX2)
        return variant.get(op, {}).get("cpu", {}).get(dtype, ours)
    return ours


def native_below(op: str, kind: str) -> Optional[tuple]:
    """The NATIVE_FASTER_BELOW rule of ``op`` on device type ``kind`` for this CPU and the ISA our CPU kernels run at:
    (size from which ours runs a call with a gradient, without one, why), or None."""
    if kind == "cpu":
        variant = _cpu_variant(NATIVE_FASTER_BELOW_AVX2, NATIVE_FASTER_BELOW_OURS_AVX2)
        if op in variant:
            return variant[op].get(kind)
    return NATIVE_FASTER_BELOW.get(op, {}).get(kind)


def _sized(rule, size: Optional[int], grad: bool, native: bool) -> Optional[str]:
    """The reason of a *_DTYPE rule if it applies to a call of ``size`` (None: unknown): a plain reason at any known
    size; a sized one (with a gradient, without, why) from that size up in the NATIVE tables, up to it in the OURS
    ones (an unknown size takes torch's kernel either way)."""
    if rule is None:
        return None
    if size is None:
        return (rule if isinstance(rule, str) else rule[2]) if native else None
    if isinstance(rule, str):
        return rule
    below = _below(size, rule[0 if grad else 1] + (0 if native else 1))  # (the OURS rules' bound is inclusive)
    if below is None:
        return _sized(rule, None, grad, native)
    if below:  # (a branch: under torch.compile a guard on the symbolic size; a SymBool compared with a bool raises)
        return None if native else rule[2]
    return rule[2] if native else None


# op -> why torch's own kernel, which prefer_native may hand automatic calls to, fails under forward-mode AD
# (NotImplementedError, torch 2.14 on the CPU): under it such calls take the kernel chain, which forward_ad_reason
# sends to the reference. torch's cross_entropy, linear_cross_entropy and lstm_cell ran jvp: they keep torch's.
# (cuDNN's LSTM and the CUDA SDPA kernels are assumed the same, unchecked for want of a GPU: the reference is right
# either way.)
NATIVE_WITHOUT_FORWARD_AD: Dict[str, str] = {
    "scaled_dot_product_attention": "torch's fused SDPA kernels (_scaled_dot_product_flash_attention_for_cpu) have "
                                    "no forward derivative",
    "lstm": "torch's oneDNN LSTM (mkldnn_rnn_layer) has no forward derivative",
}


_no_kernel_warned = False


def _record_native(op: str, device: torch.device, why: str) -> None:
    """last_dispatch[op] = ("torch", {the op's first backend on the device: why})."""
    _record(op, ("torch", {_chain(device, op)[0]: why}))


def _below(size, bound) -> Optional[bool]:
    """size < bound, as the size rules compare; None where an export cannot tell without a guard. Under torch.export
    a dynamic dimension is symbolic and comparing it guards, which export refuses inside the range the user declared
    ("Constraints violated"): there a rule applies only where it holds over the whole range, and a range across its
    bound is an unknown size (as strict export hides the SymInt behind an int, the test is the same in both modes,
    and the program does not depend on the example input). torch.compile compares: its guards recompile when a call
    crosses the bound, choosing again."""
    if not torch.compiler.is_exporting():
        return size < bound
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    if statically_known_true(size < bound):
        return True
    return False if statically_known_true(size >= bound) else None


def prefer_native(op: str, device: torch.device, backend: Optional[str], size: Optional[int] = None,
                  grad: bool = True, dtype: Optional[torch.dtype] = None, tensors: Sequence[object] = (),
                  uncovered: Optional[str] = None) -> Optional[str]:
    """Why this automatic call of ``op`` should run torch's own kernel (None: run ours). Records the decision in
    ``last_dispatch`` when it says yes. The caller checks first that torch can express the call; ``size`` and
    ``grad`` (whether the call records a gradient) select the NATIVE_FASTER_BELOW rule and the sized *_DTYPE
    ones, ``dtype`` (the input's) the NATIVE_FASTER_DTYPE one and the OURS_FASTER_DTYPE exceptions. ``tensors``:
    the call's differentiable inputs, as for ``choose``: under forward-mode AD on them, never torch's kernel of an
    op in NATIVE_WITHOUT_FORWARD_AD (``choose`` then runs the reference). ``uncovered``: why no kernel of ours can
    run the call (an option none covers): torch's op runs it, for that reason rather than a speed rule, since the
    only backend left is the reference (plain PyTorch)."""
    global _no_kernel_warned
    if backend is not None or preferred() is not None or getenv("PYKERNELS_BACKEND"):
        return None
    if op in NATIVE_WITHOUT_FORWARD_AD and forward_ad_reason(tensors):
        logger.debug("%s: not torch's own kernel under forward-mode AD: %s", op, NATIVE_WITHOUT_FORWARD_AD[op])
        return None
    off = getenv("PYKERNELS_PREFER_NATIVE")
    if off is not None and off.strip().lower() in ("0", "false", "no", "off"):
        return None
    kind = device.type  # (a new str at each read of the property)
    if kind == "cpu" and not _ext.loaded():
        # no kernel of the CPU's chain (the C++ one) can run: torch's op beats the reference (plain PyTorch, several
        # ops). CUDA tensors keep their chain (a GPU machine without the extension still has Triton).
        why = f"no pykernels kernel runs on CPU tensors here (cpu: {_ext.load_error})"
        if not _no_kernel_warned and not torch.compiler.is_compiling():  # (a logger call would break a fullgraph)
            _no_kernel_warned = True
            logger.warning("%s: automatic calls run torch's own ops where torch can express them, else the "
                           "reference", why)
        _record_native(op, device, why)
        return why
    if torch.jit.is_tracing():
        # torch.jit.trace's check re-traces under no_grad, where the sized rules may pick the other kernel ("graphs
        # differed"); torch's op traces the same in every mode and the traced graph loads without pykernels
        why = "torch.jit.trace: torch's own op (the same graph in every grad mode)"
        _record_native(op, device, why)
        return why
    if uncovered is not None:
        why = f"{uncovered}: torch's own op runs the call (the reference is plain PyTorch)"
        if not torch.compiler.is_compiling():
            logger.debug("%s: ran torch's own kernel: %s", op, why)
        _record_native(op, device, why)
        return why
    if (size is not None and kind == "cpu" and dtype in OURS_WITHOUT_ONEDNN.get(op, {})
            and dtype not in _native.ONEDNN_DTYPES):  # an unknown size takes torch's kernel, as in _sized
        return None
    if dtype is not None and _sized(ours_faster_dtype(op, kind, dtype), size, grad, native=False):
        return None
    why = NATIVE_FASTER.get(op, {}).get(kind)
    if why is None and dtype is not None:
        why = _sized(NATIVE_FASTER_DTYPE.get(op, {}).get(kind, {}).get(dtype), size, grad, native=True)
    if why is None and size is not None:
        rule = native_below(op, kind)
        if rule is not None and _below(size, rule[0 if grad else 1]):  # (None, a range across the bound: ours)
            why = rule[2]
    if why is not None:
        if not torch.compiler.is_compiling():
            logger.debug("%s: ran torch's own kernel: %s", op, why)
        _record_native(op, device, why)
    return why


def forward_ad_reason(tensors: Sequence[object]) -> Optional[str]:
    """Why no kernel can run a call under forward-mode AD (None: not under it). The kernel ops have no forward
    derivative: a tangent on an input (a dual tensor of ``torch.autograd.forward_ad``, or ``torch.func.jvp`` /
    ``jacfwd``) would be dropped, giving a zero tangent, where plain PyTorch (the reference) propagates it."""
    if torch.compiler.is_compiling():
        return None
    stack = torch._C._functorch.get_interpreter_stack() or ()
    if any(i.key() == torch._C._functorch.TransformType.Jvp for i in stack):
        return "forward-mode AD (torch.func.jvp / jacfwd): the kernels have no forward derivative"
    if torch.autograd.forward_ad._current_level >= 0 and any(
            isinstance(t, torch.Tensor) and torch.autograd.forward_ad.unpack_dual(t).tangent is not None
            for t in tensors):
        return "forward-mode AD (an input is a dual tensor): the kernels have no forward derivative"
    return None


def reverse_transform_reason() -> Optional[str]:
    """Why no kernel can run a call under functorch's reverse mode (``torch.func.grad`` / ``vjp`` / ``jacrev``;
    None: not under it). torch's custom-op autograd refuses those transforms ("must override the setup_context
    staticmethod"), where plain PyTorch (the reference) and torch's own ops run them."""
    if torch.compiler.is_compiling():
        return None
    grad = torch._C._functorch.TransformType.Grad  # (vjp and jacrev push a Grad level too)
    if any(i.key() == grad for i in torch._C._functorch.get_interpreter_stack() or ()):
        return "functorch's reverse mode (torch.func.grad / vjp / jacrev): the kernel ops' autograd refuses it"
    return None


EMPTY_INPUT = "empty input"


def choose(op: str, device: torch.device, backend: Optional[str],
           unsupported: Callable[[str], Optional[str]], order: Optional[Sequence[str]] = None,
           tensors: Sequence[object] = (), empty: bool = False) -> str:
    """Pick the backend for one call of ``op``.

    ``unsupported(b)`` returns why backend ``b`` cannot run this particular call (dtype, option, ...) or None.
    ``order`` replaces the device's chain for this call where the op measured a different ranking. ``tensors``:
    the call's differentiable inputs (forward-mode tangents on them run on the reference, see forward_ad_reason).
    ``empty``: the call has no work (an empty batch), which the reference answers as torch does (shapes, dtype,
    NaN mean, empty gradients): it runs there under any request, a hard one included (a data loader's empty last
    batch must not crash a model that asked for a backend), recorded as ("reference", {backend: "empty input"}).
    A backend that cannot run on the device at all still refuses it.
    """
    forward_ad = forward_ad_reason(tensors) or reverse_transform_reason()

    def reason(b: str) -> Optional[str]:
        reference_only = None if b == "reference" else EMPTY_INPUT if empty else forward_ad
        return _device_reason(b, device) or reference_only or unsupported(b)

    if backend is not None:
        why = reason(_check_name(backend))
        if why == EMPTY_INPUT:
            _record(op, ("reference", {backend: why}))
            return "reference"
        if why:
            raise BackendUnavailableError(f"{op}: backend {backend!r} cannot run this call: {why}")
        _record(op, (backend, {}))
        return backend

    prefer = preferred()
    where = "backend"
    if prefer is None:
        prefer = getenv("PYKERNELS_BACKEND") or None
        where = "the environment variable PYKERNELS_BACKEND"
    candidates = list(order or _chain(device, op))
    if prefer is not None:
        _check_name(prefer, where)
        candidates = [prefer] + [b for b in candidates if b != prefer]
    skipped: Dict[str, str] = {}
    for b in candidates:
        why = reason(b)
        if why is None:
            if skipped and not torch.compiler.is_compiling():
                logger.debug("%s: ran on %r; skipped %s", op, b, skipped)
            _record(op, (b, skipped))
            return b
        skipped[b] = why
    raise BackendUnavailableError(f"{op}: no backend can run this call: {skipped}")  # reference never refuses
