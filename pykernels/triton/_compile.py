"""Ahead-of-time compilation of @triton.jit kernels for real GPU targets, without a GPU.

The interpreter (TRITON_INTERPRET=1) is more lenient than the compiler, so CI also compiles every kernel for
sm_80 and sm_90 and inspects the result (PTX instructions, spills). Used by the tests of every kernel family.
"""
from __future__ import annotations

import inspect
from typing import Dict

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def _jit_fn(kernel):
    # Under TRITON_INTERPRET=1 @triton.jit gives an InterpretedFunction; the compiler wants the JITFunction.
    return getattr(kernel, "fn", kernel) if not hasattr(kernel, "arg_names") else kernel


def compile_for(kernel, signature: Dict[str, str], constexprs: Dict[str, object], arch: int, num_warps: int = 4):
    """Compile ``kernel`` for ``sm_<arch>``. ``signature`` maps every non-constexpr argument to a Triton type
    ("*bf16", "*fp32", "*i64", "i32", "i64", "fp32"); ``constexprs`` maps constexpr arguments to values."""
    fn = _jit_fn(kernel)
    if not hasattr(fn, "arg_names"):
        fn = triton.JITFunction(inspect.unwrap(kernel.fn if hasattr(kernel, "fn") else kernel))
    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def spills(compiled) -> int:
    """Registers spilled to local memory (0 in a healthy hot loop)."""
    md = compiled.metadata
    n = getattr(md, "n_spills", None)
    if n is None and isinstance(md, dict):
        n = md.get("n_spills")
    if n is None:  # older metadata: count local stores in the PTX
        n = compiled.asm["ptx"].count("st.local")
    return int(n)
