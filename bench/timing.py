"""Timing, peak memory and the device's measured ceilings.

CUDA: triton.testing.do_bench (CUDA events per call, L2 flushed before each), its raw samples (return_mode="all")
pooled until there are at least MIN_CUDA_SAMPLES, then median with p20/p80 of them; for launch-bound cases also
do_bench_cudagraph, the same step replayed from a CUDA graph (the host's launch cost removed). CPU:
torch.utils.benchmark's blocked_autorange with the process's thread count, the one the JSON records (median and IQR;
p20/p80 over its blocks); the providers of a case are timed interleaved (time_interleaved), as a CPU's speed drifts
between runs: the 2-core build VM switched between two speeds 19% apart at random moments, so whichever provider ran
in the slow stretch looked slower.
"""
from __future__ import annotations

import statistics
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

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


class Timing(NamedTuple):
    """A step's times in milliseconds: the quantiles and the samples they are of (CUDA: one per timed call; CPU:
    blocked_autorange's blocks, each the mean of its calls)."""
    p50: float
    p20: float
    p80: float
    iqr: Optional[float]  # CPU only
    samples: List[float]


def time_ms(fn: Callable[[], object], device: torch.device, grad_to_none: Optional[Sequence[torch.Tensor]] = None,
            quick: bool = False) -> Timing:
    """``fn``'s Timing on ``device`` (CUDA: do_bench's per-call samples, no IQR)."""
    if device.type == "cuda":
        return _quantiles_ms(cuda_samples_ms(fn, grad_to_none, quick))._replace(iqr=None)
    return time_interleaved([fn], [grad_to_none], quick=quick)[0]


# do_bench's warmup and rep are time budgets in ms (it times n_repeat = max(1, int(rep / estimate)) calls): with
# rep alone, a 31 ms step got ONE timed call in --quick and three in a full run (p20 = p50 = p80 in the H200 file
# of 2026-12-04). So at least this many timed calls, more where the budget fits more.
MIN_CUDA_SAMPLES = {True: 10, False: 25}  # keyed by quick


def cuda_samples_ms(fn: Callable[[], object], grad_to_none: Optional[Sequence[torch.Tensor]] = None,
                    quick: bool = False) -> list:
    """Per-call times (ms) of ``fn`` from triton.testing.do_bench (same signature in Triton 3.6 and 3.8): one call
    with the usual budget, then, for a step too long to fit MIN_CUDA_SAMPLES in it, further calls whose rep is
    sized from the samples so far for the missing ones (20% spare: do_bench sizes n_repeat by its own estimate,
    which includes its L2 flush). The time spent is then about max(rep, MIN_CUDA_SAMPLES * step) plus do_bench's
    few untimed estimate and warm-up calls per round."""
    import triton.testing
    need = MIN_CUDA_SAMPLES[quick]
    warmup, rep = (10, 40) if quick else (25, 100)
    times: list = []
    for _ in range(4):  # one round normally, two for a long step; bounded whatever the estimates do
        times += [float(t) for t in triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                                            return_mode="all")]
        missing = need - len(times)
        if missing <= 0:
            break
        warmup, rep = 0, 1.2 * missing * statistics.median(times)  # warm already (do_bench still runs one call)
    return times


def _quantiles_ms(times_ms: Sequence[float]) -> Timing:
    """Median, p20, p80 and IQR of real samples, linear interpolation between them as triton's quantiles."""
    ts = torch.tensor(list(times_ms), dtype=torch.float64)
    q = torch.quantile(ts, torch.tensor([0.5, 0.2, 0.8, 0.25, 0.75], dtype=torch.float64)).tolist()
    return Timing(q[0], q[1], q[2], q[4] - q[3], ts.tolist())


def time_interleaved(fns: Sequence[Callable[[], object]], grads_to_none: Sequence[Optional[Sequence[torch.Tensor]]],
                     quick: bool = False, rounds: int = 5) -> list:
    """CPU: the Timing of each of ``fns``, timed in ``rounds`` rounds that each give every function 1/rounds of
    time_ms's budget (a rotated order per round, so none always goes first), the samples of all rounds pooled: a
    drift of the machine's speed during the run reaches every function alike."""
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
    return [_quantiles_ms([t * 1e3 for t in s]) for s in samples]


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


# ceilings' key of the matmul rate in each dtype, by the dtype's name as a Result records it (harness.dtype_name)
MATMUL_KEYS = {"bfloat16": "matmul_bf16_tflops", "float16": "matmul_fp16_tflops", "float32": "matmul_fp32_tflops"}


def ceilings(device: torch.device, dtypes: Sequence[torch.dtype] = (), quick: bool = False) -> dict:
    """Measured roofs of this device, so results read as % of what it can actually do (not spec sheets): copy
    bandwidth, and the matmul rate in each of ``dtypes`` (the run's: an fp32 result read against the bf16
    tensor-core rate, ~13x the fp32 one on an H100, looked 13x worse than it was). fp32 at torch's current float32
    matmul precision ("highest" unless set: no TF32). A roof is the best the machine does: each rate is taken at the
    fast end of its samples (p20), not their median (on the 2-core VMs a shared host slows some samples several
    times over: committed CPU files measured 0.10-0.30 fp32 TFLOP/s within one hour). On a CPU the fp32 rate is
    measured for every run (see matmul_roof)."""
    if device.type == "cuda":
        a = torch.randn(1 << 28, device=device)  # 1 GiB of fp32: far beyond L2, so HBM is what gets measured
        b = torch.empty_like(a)
        ms = time_ms(lambda: b.copy_(a), device, quick=quick).p20
        out = {"copy_gbps": 2 * a.numel() * a.element_size() / ms / 1e6,  # read + write
               "copy_buffer_bytes": a.numel() * a.element_size()}
        del a, b
        k = 8192
    else:
        a = torch.randn(1 << 25)  # 128 MiB: beyond any CPU cache
        b = torch.empty_like(a)
        ms = time_ms(lambda: b.copy_(a), device, quick=True).p20
        out = {"copy_gbps": 2 * a.numel() * a.element_size() / ms / 1e6, "copy_buffer_bytes": a.numel() * 4}
        del a, b
        # short: torch's CPU matmul without native bf16/fp16 instructions ran 256^3 in ~60 ms on the AVX2 VM
        # (0.5 GFLOP/s; fp32 ~30 GFLOP/s a thread, about its peak already at 256)
        k = 256
        dtypes = (*dtypes, torch.float32)  # the roof of 16-bit work where the CPU has no 16-bit GEMM (matmul_roof)
    for dtype in dict.fromkeys(dtypes):
        x = torch.randn(k, k, device=device, dtype=dtype)
        y = torch.randn(k, k, device=device, dtype=dtype)
        ms = time_ms(lambda: x @ y, device, quick=quick or device.type != "cuda").p20
        out[MATMUL_KEYS[str(dtype).replace("torch.", "")]] = 2 * k ** 3 / ms / 1e9
        out["matmul_shape"] = [k, k, k]
        x = y = None  # (not del: the lambda above reads them, pyflakes flags a del)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def matmul_roof(dtype: str, ceilings: dict) -> Optional[float]:
    """The matmul rate a result in ``dtype`` (harness.dtype_name) is read against: the fastest way the measured
    machine multiplies such operands, its own dtype's GEMM or fp32 GEMMs on converted copies (the conversion is
    O(k^2) to the product's O(k^3)). They differ on CPUs where torch's 16-bit matmul is the slower (fp16 on the
    AVX-512 Intel VMs, 5-100x; bf16 without AVX512-BF16, a generic loop), which is where our CPU kernels run fp32
    GEMMs on converted operands (csrc/cpu/gemm_dtype.h): read against the 16-bit rate they could pass 100%. On GPUs
    the tensor-core rate is the larger. None where this dtype's rate was not measured."""
    own = ceilings.get(MATMUL_KEYS.get(dtype, ""))
    if not own:
        return None
    return max(own, ceilings.get(MATMUL_KEYS["float32"]) or 0.0)
