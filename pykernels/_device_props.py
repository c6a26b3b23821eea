"""GPU properties that the dispatch weighs (shared memory per block, multiprocessors), read the same way in eager
calls and under torch.compile: torch.cuda.get_device_properties does not trace, so these are marked as
``torch.compiler.assume_constant_result`` marks (``constant_under_compile``): Dynamo calls them once while tracing,
with the call's device index, and bakes the value into the graph (guarded on the device, an input of the call).
Without that, compiled calls skipped the checks and a kernel that the GPU cannot hold failed at its launch."""
from __future__ import annotations

from typing import Optional

import torch


def constant_under_compile(fn):
    """``torch.compiler.assume_constant_result`` without its import of torch._dynamo, which pulls in torch._inductor
    and Triton at `import pykernels` (tests/test_import.py keeps that import light): the mark that decorator sets
    (tests/test_attention_cuda.py checks that it still is the one)."""
    fn._dynamo_marked_constant = True
    return fn


def _props(index: Optional[int]):
    return torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)


@constant_under_compile
def smem_optin(index: Optional[int]) -> int:
    """Opt-in shared memory per block (bytes) of CUDA device ``index`` (None: the current one)."""
    return int(_props(index).shared_memory_per_block_optin)


@constant_under_compile
def sm_count(index: Optional[int]) -> int:
    """Multiprocessors of CUDA device ``index`` (None: the current one)."""
    return int(_props(index).multi_processor_count)
