"""Ahead-of-time compilation of @triton.jit kernels for real GPU targets, without a GPU.

The interpreter (TRITON_INTERPRET=1) is more lenient than the compiler, so CI also compiles every kernel for
sm_80 and sm_90 and inspects the result (PTX instructions, registers, spills). Used by the tests of every kernel
family. Compile in a process where TRITON_INTERPRET is unset (``run_uninterpreted``): under the interpreter
@triton.jit builds interpreter objects, also for the helper functions a kernel calls.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, Iterable

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def _jit_fn(kernel):
    # Under TRITON_INTERPRET=1 @triton.jit gives an InterpretedFunction; the compiler wants the JITFunction.
    return getattr(kernel, "fn", kernel) if not hasattr(kernel, "arg_names") else kernel


def compile_for(kernel, signature: Dict[str, str], constexprs: Dict[str, object], arch: int, num_warps: int = 4,
                aligned: Iterable[str] = (), **options):
    """Compile ``kernel`` for ``sm_<arch>``. ``signature`` maps every non-constexpr argument to a Triton type
    ("*bf16", "*fp32", "*i64", "i32", "i64", "fp32"); ``constexprs`` maps constexpr arguments to values (also
    plain arguments: the runtime JIT turns ints equal to 1 into constants). ``aligned`` names the arguments the
    runtime JIT would mark 16-divisible (16-byte aligned pointers, ints % 16 == 0), so the compile sees the
    vectorised loads a GPU runs. ``options``: e.g. num_stages, maxnreg. Constexprs and attrs are keyed by
    (argument index,) tuples, which triton 3.6 to 3.8 all accept."""
    fn = _jit_fn(kernel)
    if not hasattr(fn, "arg_names"):
        fn = triton.JITFunction(inspect.unwrap(kernel.fn if hasattr(kernel, "fn") else kernel))
    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned if a in signature}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, **options})


def resource_usage(compiled) -> Dict[str, int]:
    """{"regs", "stack", "local", "shared"} per thread / block from the cubin (cuobjdump): CompiledKernel.n_regs
    is only filled in when the kernel is loaded on a GPU. Empty if cuobjdump is not found."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", out)}


def spills(compiled) -> int:
    """Registers spilled to local memory (0 in a healthy hot loop)."""
    md = compiled.metadata
    n = getattr(md, "n_spills", None)
    if n is None and isinstance(md, dict):
        n = md.get("n_spills")
    if n is None:  # metadata without spill counts: count local stores in the PTX and the cubin's local frame
        n = compiled.asm["ptx"].count("st.local") + resource_usage(compiled).get("local", 0)
    return int(n)


def run_uninterpreted(code: str, timeout: float = 900) -> object:
    """Run ``code`` in a fresh Python with TRITON_INTERPRET unset and the repository importable; the code prints
    one JSON value as its last line, which is returned."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout,
                       cwd=root)
    if p.returncode != 0:
        raise RuntimeError(f"compile subprocess failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])
