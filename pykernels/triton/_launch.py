"""How every Triton kernel of pykernels is launched: through ``torch.library.wrap_triton``, so that torch.compile
traces the launch inside our ``triton_op``s."""
from __future__ import annotations

import torch


def wrap(kernel):
    """``torch.library.wrap_triton(kernel)``; under TRITON_INTERPRET=1 on torch versions whose wrap_triton accepts
    only ``JITFunction``/``Autotuner`` (2.11; the interpreter's ``triton.jit`` makes an ``InterpretedFunction``),
    the kernel itself, launched directly: nothing can trace an interpreted launch anyway (the interpreter cannot
    run on fake tensors)."""
    try:
        return torch.library.wrap_triton(kernel)
    except RuntimeError:
        if type(kernel).__name__ != "InterpretedFunction" and type(getattr(kernel, "fn", None)).__name__ \
                != "InterpretedFunction":
            raise
        return kernel
