"""Ahead-of-time compilation of @triton.jit kernels for real GPU targets, without a GPU.

The interpreter (TRITON_INTERPRET=1) is more lenient than the compiler, so CI also compiles every kernel for
sm_80 and sm_90 and inspects the result (PTX instructions, spills). Used by the tests of every kernel family.
"""
from __future__ import annotations

import inspect
from typing import Dict, Iterable, Optional

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def _jit_fn(kernel):
    # Under TRITON_INTERPRET=1 @triton.jit gives an InterpretedFunction; the compiler wants the JITFunction.
    return getattr(kernel, "fn", kernel) if not hasattr(kernel, "arg_names") else kernel


def compile_for(kernel, signature: Dict[str, str], constexprs: Dict[str, object], arch: int, num_warps: int = 4,
                num_stages: Optional[int] = None, unit: Iterable[str] = (), divisible: Iterable[str] = ()):
    """Compile ``kernel`` for ``sm_<arch>``. ``signature`` maps every non-constexpr argument to a Triton type
    ("*bf16", "*fp32", "*i64", "i32", "i64", "fp32"); ``constexprs`` maps constexpr arguments to values;
    ``num_stages`` as the launcher passes it (None: Triton's default). A launch specialises what the values show:
    an int equal to 1 becomes a constexpr (name it in ``unit``, e.g. an innermost stride), and pointers and ints
    divisible by 16 are marked so (name them in ``divisible``), which lets loads vectorise and changes register
    allocation: compile as the kernel is launched where spills are counted."""
    fn = _jit_fn(kernel)
    if not hasattr(fn, "arg_names"):
        fn = triton.JITFunction(inspect.unwrap(kernel.fn if hasattr(kernel, "fn") else kernel))
    constexprs = dict(constexprs, **{name: 1 for name in unit})
    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    options = {"num_warps": num_warps} if num_stages is None else {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def spills(compiled) -> int:
    """Bytes ptxas spills to local memory (0 in a healthy hot loop), from its own resource report (``ptxas -v``
    on the kernel's PTX): without a GPU the metadata has no spill count, and the PTX itself never shows the spills
    ptxas makes while allocating registers. Falls back to the PTX's local stores when ptxas cannot be run."""
    import os
    import re
    import subprocess
    import tempfile

    ptx = compiled.asm["ptx"]
    m = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        arch = int(re.sub(r"\D", "", m.group(1))) if m else 80
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        try:
            p = subprocess.run([get_ptxas(arch).path, f"-arch={m.group(1) if m else 'sm_80'}", "-v", f.name, "-o",
                                os.devnull], capture_output=True, text=True, timeout=300)
        finally:
            os.unlink(f.name)
        if p.returncode == 0:
            return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", p.stderr))
    except (ImportError, OSError, subprocess.SubprocessError, TypeError):
        pass
    return ptx.count("st.local")


_TRITON_DTYPE = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float64": "fp64",
                 "torch.int64": "i64", "torch.int32": "i32", "torch.int16": "i16", "torch.int8": "i8",
                 "torch.uint8": "u8", "torch.bool": "i1"}


def inductor_view(kernel, launch: Dict[str, object], arch: int = 90):
    """How torch.compile sees one launch of ``kernel`` (``launch``: argument -> ("tensor", dtype string) or the
    scalar passed), checked without a GPU. Returns (tensors the kernel writes according to torch's TTIR mutation
    analysis, error of building the TTIR the way Inductor types the arguments or None).

    Inductor types Python floats as fp64 scalars and, like Triton < 3.7, specialises an int equal to 1 into a
    constexpr: a kernel must build under both (``x.to(...)`` on an int argument, or fp64 arithmetic redefining an
    fp32 variable in a branch, fail there while the eager launch works). A kernel whose TTIR cannot be built is
    assumed to write every tensor argument, which makes torch.compile fail on leaf inputs."""
    import torch
    from torch._higher_order_ops import triton_kernel_wrap as tkw
    import triton.runtime as truntime

    fn = _jit_fn(kernel)
    if not hasattr(fn, "arg_names"):
        fn = triton.JITFunction(inspect.unwrap(kernel.fn if hasattr(kernel, "fn") else kernel))

    class _Target:  # torch's analysis asks the active driver for the target
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

    kwargs, sig, consts = {}, {}, {}
    for name in fn.arg_names:
        v = launch.get(name)
        is_constexpr = fn.params[fn.arg_names.index(name)].is_constexpr
        if isinstance(v, tuple) and v and v[0] == "tensor":
            kwargs[name] = torch.empty(2, dtype=getattr(torch, v[1].split(".")[-1]))
            sig[name] = "*" + _TRITON_DTYPE[v[1]]
            continue
        kwargs[name] = v
        if is_constexpr or v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
        else:
            sig[name] = "fp64"
    old = truntime.driver._active  # no GPU here: no default driver to ask for
    truntime.driver.set_active(_Target())
    try:
        access = tkw.identify_accessed_tensors(fn, kwargs, {}) if hasattr(tkw, "identify_accessed_tensors") else None
        writes = sorted(d.name for d in access.read_writes.writes if isinstance(kwargs.get(d.name), torch.Tensor)) \
            if access is not None else sorted(tkw.identify_mutated_tensors(fn, kwargs, {}))
    finally:
        truntime.driver._active = old
    error = None
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
        backend = triton.compiler.compiler.make_backend(GPUTarget("cuda", arch, 32))
        options = backend.parse_options({})
        context = triton._C.libtriton.ir.context()
        triton._C.libtriton.ir.load_dialects(context)
        backend.load_dialects(context)
        src.make_ir(GPUTarget("cuda", arch, 32), options, backend.get_codegen_implementation(options),
                    backend.get_module_map(), context)
    except Exception as e:  # noqa: BLE001 - reported to the caller
        error = f"{type(e).__name__}: {e}"[:2000]
    return writes, error
