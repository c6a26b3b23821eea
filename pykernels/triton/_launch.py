"""How every Triton kernel of pykernels is launched: through ``torch.library.wrap_triton``, so that torch.compile
traces the launch inside our ``triton_op``s, on the device of the tensors it is given."""
from __future__ import annotations

import torch


class _OnTensorsDevice:
    """A launcher (``launcher[grid](*args)``) that runs on the device of its first CUDA tensor argument. Triton
    launches on the *current* CUDA device and its current stream, whatever the arguments' device: a call on
    tensors of cuda:1 while cuda:0 is current (model parallelism in one process) would otherwise run on cuda:0 with
    cuda:1's pointers. A compiled graph sets the device itself."""

    def __init__(self, launcher):
        self.launcher = launcher

    def __getitem__(self, grid):
        run = self.launcher[grid]

        def call(*args, **kwargs):
            index = launch_device(args, kwargs)
            if index is None:
                return run(*args, **kwargs)
            with torch.cuda.device(index):
                return run(*args, **kwargs)
        return call


def launch_device(args, kwargs) -> "int | None":
    """The CUDA device index to switch to for a launch with these arguments (None: stay, it is current or there
    is no CUDA tensor, or torch.compile is tracing)."""
    if torch.compiler.is_compiling():
        return None
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and a.device.type == "cuda":
            current = torch.cuda.current_device()
            index = current if a.device.index is None else a.device.index
            return None if index == current else index
    return None


def wrap(kernel):
    """``torch.library.wrap_triton(kernel)``, launched on its tensors' device; under TRITON_INTERPRET=1 on torch
    versions whose wrap_triton accepts only ``JITFunction``/``Autotuner`` (2.11; the interpreter's ``triton.jit``
    makes an ``InterpretedFunction``), the kernel itself, launched directly: nothing can trace an interpreted launch
    anyway (the interpreter cannot run on fake tensors)."""
    try:
        return _OnTensorsDevice(torch.library.wrap_triton(kernel))
    except RuntimeError:
        if type(kernel).__name__ != "InterpretedFunction" and type(getattr(kernel, "fn", None)).__name__ \
                != "InterpretedFunction":
            raise
        return kernel


def timing_autotune_allowed() -> bool:
    """Whether a kernel may pick its tiles by timing candidates: not under torch.use_deterministic_algorithms(True),
    as torch turns cuDNN's benchmarking off there. The tiles change the summation order, so a timed pick can
    change the bits from one process to the next."""
    return not torch.are_deterministic_algorithms_enabled()
