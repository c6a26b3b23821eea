"""Sweep the cross-entropy launch knobs on a GPU (rows in flight vs L2, threads/warps, chunk size) and print
fwd+bwd time and effective bandwidth for each; the defaults in the launchers come from these measurements.
`python -m bench.tune_cross_entropy [N V]`"""
from __future__ import annotations

import itertools
import os
import sys

import torch
import triton.testing

import pykernels


def main():
    shapes = [(int(sys.argv[1]), int(sys.argv[2]))] if len(sys.argv) > 2 else [(8192, 128256), (8192, 32000)]
    for N, V in shapes:
        sweep(N, V)


def sweep(N, V):
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")
    floor_bytes = 2 * N * V * 2
    grid = {"cuda": [dict(PYKERNELS_CE_NO_CLUSTER=1, PYKERNELS_CE_L2_PERCENT=p) for p in (100, 250)] +
                    [dict(PYKERNELS_CE_CLUSTER_THREADS=th, PYKERNELS_CE_CLUSTER_CHUNK_KB=kb,
                          PYKERNELS_CE_CLUSTER_CPASYNC=cp)
                     for th, kb, cp in itertools.product([256, 512], [32, 64, 96], [0, 1])],
            "triton": [dict(PYKERNELS_CE_L2_PERCENT=p, PYKERNELS_CE_WARPS=w, PYKERNELS_CE_BLOCK_BYTES=b)
                       for p, w, b in itertools.product([150, 250, 400], [4, 8, 16], [8192, 16384])]}
    for backend, configs in grid.items():
        for cfg in configs:
            os.environ.update({k: str(v) for k, v in cfg.items()})
            step = lambda: pykernels.functional.cross_entropy(x, t, backend=backend).backward()  # noqa: E731
            ms = triton.testing.do_bench(step, warmup=20, rep=100, grad_to_none=[x], quantiles=[0.5])
            ms = ms[0] if isinstance(ms, (list, tuple)) else ms
            print(f"{N}x{V} {backend:7} {cfg} {ms:.3f} ms {floor_bytes / ms / 1e6:.0f} GB/s")
            for k in cfg:
                os.environ.pop(k)


if __name__ == "__main__":
    main()
