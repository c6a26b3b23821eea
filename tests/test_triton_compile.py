"""Triton kernels compiled for real GPU targets (sm_80, sm_90) on a machine without a GPU: the interpreter is
more lenient than the compiler, so every kernel variant must also compile, without register spills."""
from __future__ import annotations

import textwrap

import pytest

from conftest import assert_spill_budget, run_script_compiled

pytest.importorskip("triton")

_SCRIPT = textwrap.dedent('''
    import os, sys, json
    os.environ.pop("TRITON_INTERPRET", None)   # compile for real targets, not for the interpreter
    sys.path.insert(0, {root!r})
    from pykernels.triton import cross_entropy as k
    from pykernels.triton._compile import compile_for, spills
    out = []
    for arch in (80, 90):
        for dt in ("bf16", "fp16", "fp32"):
            sig = {{"X": f"*{{dt}}", "TI": "*i64", "TP": f"*{{dt}}", "Wt": "*fp32", "Wsum": "*fp32",
                   "Scale": "*fp32", "Loss": "*fp32", "Lse": "*fp32", "LseIn": "*fp32", "G": f"*{{dt}}",
                   "M": "i32", "C": "i32", "D": "i32", "sn": "i64", "sc": "i64", "sd": "i64", "tn": "i64",
                   "tc": "i64", "td": "i64", "scale_stride": "i32", "ignore_index": "i64", "eps": "fp32",
                   "zl": "fp32"}}
            for mode in (0, 1, 2):
                for prob in (False, True):
                    for flags in ((False, False, False, False), (True, True, True, True)):
                        c = compile_for(k._cross_entropy_kernel, sig,
                                        dict(MODE=mode, PROB=prob, HAS_W=flags[0], SMOOTH=flags[1],
                                             ZLOSS=flags[2], HAS_SCALE=flags[3], BLOCK=8192), arch, num_warps=16)
                        out.append(("ce", arch, dt, mode, prob, flags[0], spills(c), "ld.global" in c.asm["ptx"]))
            c = compile_for(k._scale_grad_kernel, {{"G": f"*{{dt}}", "Scale": "*fp32", "total": "i64", "CD": "i64",
                            "D": "i64"}}, dict(PER_ROW=False, BLOCK=4096), arch, num_warps=8)
            out.append(("scale", arch, dt, 0, False, False, spills(c), "ld.global" in c.asm["ptx"]))
    print(json.dumps(out))
''')


def _compile_all():
    return run_script_compiled(_SCRIPT)


# (kernel, arch, dtype, mode, probability targets, weighted) -> bytes (see conftest.assert_spill_budget)
CE_KNOWN_SPILLS = {("ce", 90, "fp16", 2, True, True): 4}


def test_cross_entropy_kernels_compile_for_sm80_and_sm90_without_spills():
    rows = _compile_all()
    assert len(rows) == 2 * 3 * (3 * 2 * 2 + 1)
    for name, arch, dt, mode, prob, weighted, n_spills, has_loads in rows:
        assert has_loads, (name, arch, dt, mode, prob)
        assert_spill_budget(f"{name} sm_{arch} {dt} mode={mode} prob={prob} weighted={weighted}", n_spills,
                            CE_KNOWN_SPILLS, (name, arch, dt, mode, prob, weighted))
