"""Kernel-level view of one provider's step: `python -m bench.profile cross_entropy --shape 8192 128256`.

Prints the CUDA kernels a forward+backward launches (torch.profiler), their times, and the step's peak extra
memory: the first thing to read when a measured time misses the byte model."""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import pykernels


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("op", choices=["cross_entropy"])
    p.add_argument("--shape", nargs=2, type=int, default=[8192, 128256])
    p.add_argument("--providers", default="cuda,triton,torch.compile")
    a = p.parse_args(argv)
    N, V = a.shape
    x0 = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, V, (N,), device="cuda")
    fns = {"cuda": lambda x: pykernels.functional.cross_entropy(x, t, backend="cuda"),
           "triton": lambda x: pykernels.functional.cross_entropy(x, t, backend="triton"),
           "torch": lambda x: F.cross_entropy(x, t),
           "torch.compile": torch.compile(lambda x: F.cross_entropy(x, t), fullgraph=True)}
    for name in a.providers.split(","):
        x = x0.clone().requires_grad_()
        for _ in range(3):
            fns[name](x).backward()
            x.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fns[name](x).backward()
            torch.cuda.synchronize()
        print(f"=== {name}: peak extra {(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))


if __name__ == "__main__":
    main()
