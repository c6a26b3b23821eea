"""Side-by-side GPU timings of the families that have no harness suite yet (attention, linear CE, LSTM),
each against torch's own path in the same process. Prints one JSON line per case (ratios computed from
medians of triton.testing.do_bench). Usage: python -m bench.quick_gpu [attention] [lce] [lstm]"""
from __future__ import annotations

import json
import sys

import torch
import torch.nn.functional as F

import pykernels
from pykernels.functional import linear_cross_entropy, scaled_dot_product_attention


def bench(fn, grads=()):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads), return_mode="median")


def emit(**kw):
    print(json.dumps(kw), flush=True)


def attention():
    dev = "cuda"
    for B, H, L, E, causal in [(8, 16, 1024, 64, False), (8, 16, 1024, 64, True), (4, 16, 4096, 64, True),
                               (4, 16, 2048, 128, False), (4, 16, 2048, 128, True), (2, 16, 8192, 128, True)]:
        for dtype in (torch.bfloat16,):
            q, k, v = (torch.randn(B, H, L, E, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
            g = torch.randn(B, H, L, E, device=dev, dtype=dtype)
            flops_f = 4 * B * H * L * L * E * (0.5 if causal else 1.0)
            row = dict(family="attention", B=B, H=H, L=L, E=E, causal=causal, dtype=str(dtype))
            for name, f in (("pykernels", lambda: scaled_dot_product_attention(q, k, v, is_causal=causal, backend="triton")),
                            ("sdpa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))):
                try:
                    with torch.no_grad():
                        tf = bench(f)
                    tfb = bench(lambda: f().backward(g), grads=(q, k, v))
                    row[name + "_fwd_ms"] = round(tf, 4)
                    row[name + "_fwd_tflops"] = round(flops_f / tf / 1e9, 1)
                    row[name + "_fwdbwd_ms"] = round(tfb, 4)
                    row[name + "_fwdbwd_tflops"] = round(3.5 * flops_f / tfb / 1e9, 1)
                except Exception as e:  # noqa: BLE001 - report and keep going
                    row[name + "_error"] = repr(e)[:300]
            emit(**row)


def lce():
    dev = "cuda"
    for N, Hd, V in [(8192, 2048, 128256), (4096, 4096, 151936)]:
        x = torch.randn(N, Hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
        W = (torch.randn(V, Hd, device=dev) * 0.02).to(torch.bfloat16).requires_grad_()
        t = torch.randint(0, V, (N,), device=dev)
        row = dict(family="linear_cross_entropy", N=N, H=Hd, V=V)
        for name, f in (("pykernels", lambda: linear_cross_entropy(x, W, t, backend="triton")),
                        ("torch", lambda: F.cross_entropy((x @ W.t()).float(), t))):
            try:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                f().backward()
                torch.cuda.synchronize()
                row[name + "_peak_extra_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20)
                row[name + "_fwdbwd_ms"] = round(bench(lambda: f().backward(), grads=(x, W)), 3)
            except Exception as e:  # noqa: BLE001
                row[name + "_error"] = repr(e)[:300]
            x.grad = W.grad = None
        row["flops_fwdbwd_tflops_pykernels"] = round(6 * N * Hd * V / row.get("pykernels_fwdbwd_ms", float("inf")) / 1e9, 1)
        emit(**row)


def lstm():
    dev = "cuda"
    for T, B, I, H in [(128, 64, 256, 256), (256, 32, 512, 512), (64, 16, 1024, 1024)]:
        x = torch.randn(T, B, I, device=dev, requires_grad=True)
        ref = torch.nn.LSTM(I, H).to(dev)
        ours = pykernels.nn.LSTM(I, H).to(dev)
        ours.load_state_dict(ref.state_dict())
        row = dict(family="lstm", T=T, B=B, I=I, H=H, dtype="float32")
        for name, m in (("pykernels", ours), ("cudnn", ref)):
            try:
                row[name + "_fwdbwd_ms"] = round(bench(lambda: m(x)[0].sum().backward(), grads=(x,)), 3)
                with torch.no_grad():
                    row[name + "_fwd_ms"] = round(bench(lambda: m(x)), 3)
            except Exception as e:  # noqa: BLE001
                row[name + "_error"] = repr(e)[:300]
        row["dispatch"] = str(getattr(pykernels, "last_dispatch", None))
        emit(**row)


if __name__ == "__main__":
    print(pykernels.available_backends("cuda"), flush=True)
    for fam in sys.argv[1:] or ["attention", "lce", "lstm"]:
        try:
            globals()[fam]()
        except Exception as e:  # noqa: BLE001
            emit(family=fam, error=repr(e)[:500])
