"""Timing, ceilings, environment capture and result records shared by every suite.

Rules (../shared/DESIGN.md "Performance policy"): fresh random inputs (never zeros), every provider's output
checked against a float32/float64 reference on the benchmark inputs before it is timed (a wrong provider is
reported "wrong" and not timed), CUDA timing with events through triton.testing.do_bench (L2 flushed before
each call, median with p20/p80), CPU timing with torch.utils.benchmark, ratios reported side by side.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch


@dataclasses.dataclass
class Result:
    suite: str
    case: str
    provider: str
    mode: str
    dtype: str
    shape: Dict[str, int]
    status: str = "ok"  # ok | wrong | error | absent
    ms_p50: Optional[float] = None
    ms_p20: Optional[float] = None
    ms_p80: Optional[float] = None
    bytes: Optional[float] = None
    flops: Optional[float] = None
    gbps: Optional[float] = None
    pct_of_copy_bw: Optional[float] = None
    tflops: Optional[float] = None
    pct_of_matmul: Optional[float] = None
    peak_extra_mem_bytes: Optional[int] = None
    max_err: Optional[float] = None
    error: Optional[str] = None
    speedup_vs: Dict[str, float] = dataclasses.field(default_factory=dict)


def git_commit() -> str:
    if os.environ.get("PYKERNELS_GIT_COMMIT"):  # set by bench/gpu_check.sh: the device copy has no history
        return os.environ["PYKERNELS_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
        return out if len(out) == 40 else "unknown"
    except Exception:
        return "unknown"


def environment(device: torch.device) -> dict:
    env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "git_commit": git_commit(), "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": str(device)}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as e:
        env["triton"] = f"absent: {e}"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                   memory_gib=round(p.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
            env["driver"] = out.splitlines()[0] if out else "unknown"
        except Exception:
            env["driver"] = "unknown"
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def time_ms(fn: Callable[[], object], device: torch.device, grad_to_none=None, quick: bool = False):
    """(median, p20, p80) in milliseconds."""
    if device.type == "cuda":
        import triton.testing
        q = triton.testing.do_bench(fn, warmup=10 if quick else 50, rep=40 if quick else 200,
                                    grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])
        return tuple(float(v) for v in q)
    import torch.utils.benchmark as tb

    def run():
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        fn()
    m = tb.Timer(stmt="run()", globals={"run": run}).blocked_autorange(min_run_time=0.2 if quick else 1.0)
    ts = sorted(m.times)
    pick = lambda f: ts[min(len(ts) - 1, int(f * len(ts)))] * 1e3  # noqa: E731
    return m.median * 1e3, pick(0.2), pick(0.8)


def ceilings(device: torch.device, quick: bool = False) -> dict:
    """Measured roofs of this device: copy bandwidth (bytes read + written) and bf16 matmul rate."""
    out = {}
    if device.type == "cuda":
        n = (1 << 28) if not quick else (1 << 26)  # 1 GiB (fp32) buffers
        a = torch.randn(n, device=device)
        b = torch.empty_like(a)
        ms = time_ms(lambda: b.copy_(a), device, quick=quick)[0]
        out["copy_gbps"] = 2 * a.numel() * 4 / ms / 1e6
        del a, b
        k = 8192
        x = torch.randn(k, k, device=device, dtype=torch.bfloat16)
        y = torch.randn(k, k, device=device, dtype=torch.bfloat16)
        ms = time_ms(lambda: x @ y, device, quick=quick)[0]
        out["matmul_bf16_tflops"] = 2 * k ** 3 / ms / 1e9
    else:
        a = torch.randn(1 << 25)
        b = torch.empty_like(a)
        ms = time_ms(lambda: b.copy_(a), device, quick=True)[0]
        out["copy_gbps"] = 2 * a.numel() * 4 / ms / 1e6
    return out


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def finish(r: Result, ceil: dict) -> Result:
    if r.ms_p50:
        if r.bytes:
            r.gbps = r.bytes / r.ms_p50 / 1e6
            if ceil.get("copy_gbps"):
                r.pct_of_copy_bw = 100 * r.gbps / ceil["copy_gbps"]
        if r.flops:
            r.tflops = r.flops / r.ms_p50 / 1e9
            if ceil.get("matmul_bf16_tflops"):
                r.pct_of_matmul = 100 * r.tflops / ceil["matmul_bf16_tflops"]
    return r


def add_speedups(results: List[Result], baselines=("torch", "torch.compile")) -> None:
    by_case: Dict[tuple, Dict[str, Result]] = {}
    for r in results:
        by_case.setdefault((r.suite, r.case, r.mode, r.dtype), {})[r.provider] = r
    for group in by_case.values():
        for r in group.values():
            for b in baselines:
                base = group.get(b)
                if r.ms_p50 and base is not None and base.ms_p50 and b != r.provider:
                    r.speedup_vs[b] = base.ms_p50 / r.ms_p50


def write_json(path: Path, env: dict, ceil: dict, results: List[Result]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"env": env, "ceilings": ceil,
                                "results": [dataclasses.asdict(r) for r in results]}, indent=1))


def write_csv(path: Path, results: List[Result]) -> None:
    import csv
    fields = [f.name for f in dataclasses.fields(Result)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in results:
            row = dataclasses.asdict(r)
            row["shape"] = json.dumps(row["shape"])
            row["speedup_vs"] = json.dumps(row["speedup_vs"])
            w.writerow(row)


def write_plots(directory: Path, results: List[Result]) -> List[Path]:
    """One PNG per (suite, mode, dtype): GB/s (or TFLOP/s) of each provider against the swept size."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = []
    groups: Dict[tuple, List[Result]] = {}
    for r in results:
        if r.status == "ok":
            groups.setdefault((r.suite, r.mode, r.dtype), []).append(r)
    for (suite, mode, dtype), rs in groups.items():
        key = list(rs[0].shape)[-1]  # the swept dimension is the last of the shape dict
        metric = "tflops" if rs[0].tflops is not None else "gbps"
        fig, ax = plt.subplots(figsize=(7, 4))
        for prov in sorted({r.provider for r in rs}):
            pts = sorted((r.shape[key], getattr(r, metric)) for r in rs if r.provider == prov)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        ax.set_xlabel(key)
        ax.set_ylabel("TFLOP/s" if metric == "tflops" else "GB/s (floor bytes / time)")
        ax.set_title(f"{suite} {mode} {dtype}")
        ax.legend()
        ax.grid(alpha=0.3)
        path = directory / f"{suite}-{mode}-{dtype}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        out.append(path)
    return out


def progress(items, desc: str):
    """A progress bar when rich or tqdm is installed; the bare iterable otherwise."""
    try:
        from tqdm import tqdm
        return tqdm(items, desc=desc, leave=False)
    except ImportError:
        return items


def table(results: List[Result]) -> str:
    head = f"{'suite':14} {'case':22} {'mode':8} {'provider':18} {'status':6} {'ms p50':>9} {'GB/s':>8} " \
           f"{'%copy':>6} {'TFLOP/s':>8} {'xtorch':>7} {'xcompile':>8} {'extra MiB':>9}"
    lines = [head, "-" * len(head)]
    f = lambda v, fmt: format(v, fmt) if v is not None else "-"  # noqa: E731
    for r in results:
        lines.append(f"{r.suite:14} {r.case:22} {r.mode:8} {r.provider:18} {r.status:6} {f(r.ms_p50, '9.3f')} "
                     f"{f(r.gbps, '8.0f')} {f(r.pct_of_copy_bw, '6.1f')} {f(r.tflops, '8.1f')} "
                     f"{f(r.speedup_vs.get('torch'), '7.2f')} {f(r.speedup_vs.get('torch.compile'), '8.2f')} "
                     f"{f(None if r.peak_extra_mem_bytes is None else r.peak_extra_mem_bytes / 2**20, '9.0f')}")
        if r.status != "ok" and r.error:
            lines.append(f"    {r.provider}: {r.error[:150]}")
    return "\n".join(lines)
