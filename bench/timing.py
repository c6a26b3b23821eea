"""Timing, peak memory and the device's measured ceilings.

CUDA: triton.testing.do_bench (CUDA events per call, L2 flushed before each, median with p20/p80; its default
return mode is the mean, hence the explicit quantiles); for launch-bound cases also do_bench_cudagraph, the same
step replayed from a CUDA graph (the host's launch cost removed). CPU: torch.utils.benchmark's blocked_autorange
with the process's thread count, the one the JSON records (median and IQR; p20/p80 over its blocks); the providers
of a case are timed interleaved (time_interleaved), as a CPU's speed drifts between runs: the 2-core build VM
switched between two speeds 19% apart at random moments, so whichever provider ran in the slow stretch looked
slower.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch


def _torch_benchmark():
    """torch.utils.benchmark, imported without torch.utils.cpp_extension's "No CUDA runtime is found, using
    CUDA_HOME=..." warning, which a CUDA build of torch prints on a machine without a GPU: it concerns building CUDA
    extensions, not this CPU run, and read as if the benchmark lacked something."""
    import logging
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import torch.utils.benchmark as tb
    finally:
        log.setLevel(level)
    return tb


def time_ms(fn: Callable[[], object], device: torch.device, grad_to_none: Optional[Sequence[torch.Tensor]] = None,
            quick: bool = False) -> Tuple[float, float, float, Optional[float]]:
    """(median, p20, p80, IQR or None) in milliseconds."""
    if device.type == "cuda":
        import triton.testing
        q = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                    grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
        return float(q[0]), float(q[1]), float(q[2]), None
    return time_interleaved([fn], [grad_to_none], quick=quick)[0]


def _cpu_stats(times_s: Sequence[float]) -> Tuple[float, float, float, float]:
    ts = torch.tensor(list(times_s), dtype=torch.float64) * 1e3
    q = torch.quantile(ts, torch.tensor([0.5, 0.2, 0.8, 0.25, 0.75], dtype=torch.float64)).tolist()
    return q[0], q[1], q[2], q[4] - q[3]


def time_interleaved(fns: Sequence[Callable[[], object]], grads_to_none: Sequence[Optional[Sequence[torch.Tensor]]],
                     quick: bool = False, rounds: int = 5) -> list:
    """CPU: (median, p20, p80, IQR) in milliseconds of each of ``fns``, timed in ``rounds`` rounds that each give
    every function 1/rounds of time_ms's budget (a rotated order per round, so none always goes first), the
    samples of all rounds pooled: a drift of the machine's speed during the run reaches every function alike."""
    tb = _torch_benchmark()

    def runner(fn, leaves):
        def run():
            for t in leaves or ():
                t.grad = None
            fn()
        return run

    # torch.utils.benchmark.Timer runs its statement on ONE thread unless told otherwise: every CPU file before
    # 2026-12-05 05:30 UTC measured single-threaded kernels while recording the process's thread count.
    threads = torch.get_num_threads()
    runs = [runner(fn, leaves) for fn, leaves in zip(fns, grads_to_none)]
    for run in runs:
        run()  # warm-up (torch.compile, first-touch allocations) outside the measurement
    budget = (0.2 if quick else 1.0) / rounds
    samples: list = [[] for _ in runs]
    order = list(range(len(runs)))
    for k in range(rounds):
        for j in order[k % len(runs):] + order[:k % len(runs)]:
            m = tb.Timer(stmt="run()", globals={"run": runs[j]}, num_threads=threads).blocked_autorange(
                min_run_time=budget)
            samples[j].extend(m.times)
    return [_cpu_stats(s) for s in samples]


def time_ms_graph(fn: Callable[[], object], device: torch.device,
                  grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> Tuple[float, float, float]:
    """(median, p20, p80) in milliseconds of ``fn`` replayed from a CUDA graph (triton's do_bench_cudagraph):
    the launch-bound view, without the host's per-launch cost. Raises where ``fn`` cannot be captured (host
    syncs, CPU work, allocation outside the graph's pool); the caller reports that."""
    if device.type != "cuda":
        raise ValueError("CUDA graphs need a CUDA device")
    import triton.testing
    q = triton.testing.do_bench_cudagraph(fn, rep=40, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
    return float(q[0]), float(q[1]), float(q[2])


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated during one call beyond what was live before it (the inputs): CUDA only."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def ceilings(device: torch.device, quick: bool = False) -> dict:
    """Measured roofs of this device, so results read as % of what it can actually do (not spec sheets)."""
    if device.type == "cuda":
        a = torch.randn(1 << 28, device=device)  # 1 GiB of fp32: far beyond L2, so HBM is what gets measured
        b = torch.empty_like(a)
        ms = time_ms(lambda: b.copy_(a), device, quick=quick)[0]
        out = {"copy_gbps": 2 * a.numel() * a.element_size() / ms / 1e6,  # read + write
               "copy_buffer_bytes": a.numel() * a.element_size()}
        del a, b
        k = 8192
        x = torch.randn(k, k, device=device, dtype=torch.bfloat16)
        y = torch.randn(k, k, device=device, dtype=torch.bfloat16)
        ms = time_ms(lambda: x @ y, device, quick=quick)[0]
        out["matmul_bf16_tflops"] = 2 * k ** 3 / ms / 1e9
        out["matmul_shape"] = [k, k, k]
        del x, y
        torch.cuda.empty_cache()
        return out
    a = torch.randn(1 << 25)  # 128 MiB: beyond any CPU cache
    b = torch.empty_like(a)
    ms = time_ms(lambda: b.copy_(a), device, quick=True)[0]
    return {"copy_gbps": 2 * a.numel() * a.element_size() / ms / 1e6, "copy_buffer_bytes": a.numel() * 4}
