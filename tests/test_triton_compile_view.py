"""Every Triton kernel as torch.compile sees it, checked without a GPU.

Inductor does not run our launchers' kernels as the eager launch does: it builds their TTIR to find which
tensors they write (a kernel it cannot build is assumed to write every argument, so a leaf input that requires
grad makes compilation fail), passes Python floats as fp64 scalars, and specialises ints equal to 1 into
constexprs. Each of these broke a kernel on the GPU while the CPU tier was green. Here every launch of a scenario
covering all kernel variants is recorded under the interpreter and re-examined, in a process without
TRITON_INTERPRET, the way Inductor will see it."""
from __future__ import annotations

import inspect
import os
import pickle
import textwrap

import pytest
import torch

import pykernels

from conftest import run_script_compiled, require_backend

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="records launches with the Triton interpreter (TRITON_INTERPRET=1)")

# Tensors each kernel may write: its outputs. The varlen attention kernels also report their int32 cu_seqlens
# (read in a helper function, which torch's analysis treats as a possible write): never leaves that require grad.
WRITES = {
    "_attn_fwd": {"O", "LSE", "LSE_LO", "CuQ", "CuK"}, "_attn_bwd_dq": {"DQ", "DBias", "CuQ", "CuK"},
    "_attn_bwd_dkdv": {"DK", "DV", "CuQ", "CuK"}, "_attn_bwd_delta": {"Delta"}, "_dropout_mask_kernel": {"Out"},
    "_cross_entropy_kernel": {"Loss", "Lse", "LseErr", "G"}, "_scale_grad_kernel": {"G"},
    "_lce_fwd_kernel": {"Mp", "Sp", "ZYp", "ZSp"}, "_lce_dlogits_kernel": {"DL", "DBp"},
    "_lce_fused_rows_kernel": {"Z", "M", "LS", "ZY", "ZS"},
    "_cell_fwd_kernel": {"HY", "CY", "WS"}, "_cell_bwd_kernel": {"DG", "DCX"},
    "_seq_fwd_kernel": {"OUT", "WS"}, "_seq_bwd_kernel": {"DG", "DH", "DC"},
    "_split_fwd_kernel": {"OUT", "WS", "BAR"}, "_split_bwd_kernel": {"DG", "DH", "DC", "BAR"},
}


def _scenario():
    """One call of every public op variant that launches a distinct kernel specialisation, B = 1 included."""
    from pykernels.functional import (cross_entropy, linear_cross_entropy, scaled_dot_product_attention,
                                      varlen_attention)
    for causal, drop, mask in ((True, 0.0, True), (False, 0.1, False)):
        q = torch.randn(1, 4, 19, 16, requires_grad=True)
        kv = [torch.randn(1, 2, 23, 16, requires_grad=True) for _ in range(2)]
        m = torch.randn(19, 23, requires_grad=True) if mask else None
        out = scaled_dot_product_attention(q, *kv, m, dropout_p=drop, is_causal=causal, enable_gqa=True,
                                           softcap=5.0 if mask else 0.0, backend="triton")
        out.sum().backward()
    cq = torch.tensor([0, 3, 10], dtype=torch.int32)
    q = torch.randn(10, 4, 16, requires_grad=True)
    varlen_attention(q, q, q, cq, cq, 7, 7, is_causal=True, dropout_p=0.1, backend="triton").sum().backward()
    for ls, zl in ((0.0, 0.0), (0.1, 1e-3)):
        x = torch.randn(5, 37, requires_grad=True)
        t = torch.randint(0, 37, (5,))
        # (an upstream gradient other than 1: the fused gradient's in-place scale kernel; 1 hands it out as it is)
        cross_entropy(x, t, label_smoothing=ls, z_loss=zl, weight=torch.rand(37), backend="triton").backward(
            torch.tensor(2.0))
        cross_entropy(x, t, label_smoothing=ls, z_loss=zl, fused=False, backend="triton").backward()
        x = torch.randn(9, 16, requires_grad=True)
        W = torch.randn(37, 16, requires_grad=True)
        b = torch.randn(37, requires_grad=True)
        for fused in (None, True):
            linear_cross_entropy(x, W, torch.randint(0, 37, (9,)), linear_bias=b, label_smoothing=ls, z_loss=zl,
                                 softcap=3.0, fused=fused, backend="triton").backward()
    cross_entropy(torch.randn(4, 10, requires_grad=True), torch.softmax(torch.randn(4, 10), 1),
                  backend="triton").backward()
    with pykernels.use_backend("triton"):
        for B, H in ((1, 5), (3, 70)):
            lstm = pykernels.nn.LSTM(4, H, num_layers=2, bidirectional=True)
            lstm(torch.randn(3, B, 4, requires_grad=True))[0].sum().backward()
            h, c = pykernels.nn.LSTMCell(4, H)(torch.randn(B, 4, requires_grad=True))
            (h.sum() + c.sum()).backward()


def _record(monkeypatch):
    launches = []
    wrap = torch.library.wrap_triton

    def recording(kernel):
        fn = getattr(kernel, "fn", kernel)
        names = list(inspect.signature(inspect.unwrap(fn)).parameters)
        try:
            launcher = wrap(kernel)
        except RuntimeError:  # torch 2.11's wrap_triton refuses interpreted kernels (pykernels/triton/_launch.py)
            launcher = kernel

        class Grid:
            def __getitem__(self, grid):
                def run(*args, **kw):
                    spec = {n: ("tensor", str(a.dtype)) if isinstance(a, torch.Tensor) else a
                            for n, a in list(zip(names, args)) + list(kw.items())}
                    launches.append((fn.__module__, fn.__name__, spec))
                    return launcher[grid](*args, **kw)
                return run
        return Grid()

    monkeypatch.setattr(torch.library, "wrap_triton", recording)
    _scenario()
    return launches


_CHECK = textwrap.dedent('''
    import importlib, json, os, pickle, sys
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, {root!r})
    from pykernels.triton._compile import inductor_view
    seen, out = set(), []
    for mod, name, spec in pickle.load(open({path!r}, "rb")):
        key = (name, repr(sorted((k, v) for k, v in spec.items() if not isinstance(v, tuple))))
        if key in seen:
            continue
        seen.add(key)
        writes, error = inductor_view(getattr(importlib.import_module(mod), name), spec)
        out.append((name, writes, error))
    print(json.dumps(out))
''')


def test_every_kernel_builds_as_inductor_types_it_and_writes_only_its_outputs(monkeypatch, tmp_path):
    require_backend("triton", "cpu")  # the launches are recorded from interpreted runs
    launches = _record(monkeypatch)
    kernels = {name for _, name, _ in launches}
    assert kernels >= set(WRITES) - {"_dropout_mask_kernel"}, f"scenario misses {set(WRITES) - kernels}"
    path = tmp_path / "launches.pkl"
    path.write_bytes(pickle.dumps(launches))
    rows = run_script_compiled(_CHECK, path=str(path))
    problems = [f"{name}: TTIR as Inductor types it fails: {error}" for name, _, error in rows if error]
    problems += [f"{name} writes {sorted(set(w) - WRITES[name])} besides its outputs" for name, w, _ in rows
                 if not set(w) <= WRITES[name]]
    assert not problems, "\n".join(problems)
