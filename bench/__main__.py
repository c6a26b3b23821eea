"""`python -m bench` / `pykernels-bench`: every suite, every provider, side by side in one run.

Each provider is checked against a float32 reference on the benchmark inputs before it is timed; the run writes
JSON (the record), CSV and PNG plots under --out and prints a table with GB/s (TFLOP/s) and % of the ceilings
measured at start on this device."""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import List, Optional

import torch

from . import SUITES, load_suite
from .environment import environment
from .harness import Provider, add_speedups, derive, run_suite
from .report import Progress, print_table, regressions, write_csv, write_json, write_plots
from .timing import ceilings

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _names(text: Optional[str]) -> Optional[List[str]]:
    return None if text is None else [s.strip() for s in text.split(",") if s.strip()]


def _shape(text: str) -> dict:
    return {k.strip(): int(v) for k, v in (kv.split("=") for kv in text.split(","))}


def select(providers: List[Provider], backends: Optional[List[str]], baselines: Optional[List[str]]):
    """--backends names pykernels backends (naming one runs it even where it is off by default, e.g.
    'reference'); --baselines names the others. Unset: every provider that is on by default."""
    out = []
    for p in providers:
        if p.baseline:
            keep = baselines is None or p.name in baselines
        else:
            backend = p.name[len("pykernels-"):] if p.name.startswith("pykernels-") else p.name
            keep = p.default if backends is None else backend in backends
        if keep:
            out.append(p)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pykernels-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", nargs="+", default=list(SUITES), choices=list(SUITES),
                   help="default: every registered suite")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--quick", action="store_true", help="one shape per suite, short timing (about a minute)")
    p.add_argument("--backends", default=None, help="pykernels backends, e.g. 'cuda,triton' (default: those "
                   "that target the device; 'reference' only when named)")
    p.add_argument("--baselines", default=None, help="e.g. 'torch,torch.compile,liger' (default: all; '' none)")
    p.add_argument("--modes", default=None, help="e.g. 'fwd+bwd' (default: every mode of the suite)")
    p.add_argument("--shape", default=None, help="one shape instead of the preset, with exactly one --suite, e.g. "
                   "'N=4096,V=50257' (cross_entropy), 'B=4,H=16,L=2048,E=128,causal=1' (attention), "
                   "'B=8,T=256,steps=20' (e2e: sets those fields of both models)")
    p.add_argument("--preset", default=None, help="a suite's named shape grid instead of its default shapes, with "
                   "exactly one --suite, e.g. 'fa2' (attention: FlashAttention-2's grid) or 'tutorial' (Triton's)")
    p.add_argument("--list", action="store_true", help="print each --suite's modes, shapes per device (default and "
                   "--quick) and named presets, then exit")
    p.add_argument("--out", default="bench/out", help="directory for the JSON, CSV and PNG files")
    p.add_argument("--compare", default=None, metavar="OLD.json", help="print regressions > 5%% against it")
    p.add_argument("--no-plots", action="store_true")
    return p


def list_suites(names: List[str]) -> str:
    """What each suite would run: its modes, the case names per device type (default and --quick presets) and the
    sizes of its named presets."""
    lines = []
    for name in names:
        suite = load_suite(name)
        lines.append(f"{name}: modes {', '.join(suite.MODES)}")
        for dev, dtype in (("cuda", torch.bfloat16), ("cpu", torch.float32)):
            for quick in (False, True):
                cases = suite.cases(torch.device(dev), dtype, quick)
                lines.append(f"  {dev}{' --quick' if quick else ''}: " + "; ".join(c.name for c in cases))
        for preset, shapes in getattr(suite, "NAMED_PRESETS", {}).items():
            lines.append(f"  --preset {preset}: {len(shapes)} shapes, e.g. {shapes[0]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if a.list:
        print(list_suites(a.suite))
        return 0
    for flag, value in (("--shape", a.shape), ("--preset", a.preset)):
        if value is not None and len(a.suite) != 1:
            p.error(f"{flag} names one suite's shapes: pass exactly one --suite with it (got {len(a.suite)}: "
                    f"{', '.join(a.suite)})")
    if a.shape is not None and a.preset is not None:
        p.error("--shape and --preset both choose the shapes: pass one")
    if a.preset is not None:
        named = getattr(load_suite(a.suite[0]), "NAMED_PRESETS", {})
        if a.preset not in named:
            p.error(f"--preset: suite {a.suite[0]} has " + (f"the presets {', '.join(named)}" if named else
                                                             "no named presets") + f", not {a.preset!r}")
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type != "cuda":
        why = "no CUDA GPU on this machine" if not torch.cuda.is_available() else "--device " + a.device
        print(f"CPU run ({why}): benchmarking the CPU providers only; GPU numbers come from a GPU machine.")
    env = environment(device)
    ceil = ceilings(device, quick=a.quick)
    print(f"{env['device_name']} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | "
          f"commit {env['git_commit'][:10]} | {env['date_utc']}")
    print("measured ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in ceil.items() if isinstance(v, float)))

    backends, baselines, modes = _names(a.backends), _names(a.baselines), _names(a.modes)
    plan = []
    for name in a.suite:
        suite = load_suite(name)
        provs = select(suite.providers(device, dtype), backends, baselines)
        if a.preset is not None:  # a named grid: each of its shapes as if passed by --shape
            cases = [c for shape in suite.NAMED_PRESETS[a.preset] for c in suite.cases(device, dtype, a.quick, shape)]
        else:
            cases = suite.cases(device, dtype, a.quick, shape=_shape(a.shape) if a.shape else None)
        plan.append((suite, provs, cases, [m for m in suite.MODES if modes is None or m in modes]))
    bar = Progress(sum(len(p) * len(c) * len(m) for _, p, c, m in plan))
    results = []
    try:
        for suite, provs, cases, suite_modes in plan:
            results += run_suite(suite, device, dtype, a.quick, provs, cases, suite_modes, progress=bar)
    finally:
        bar.close()
    derive(results, ceil)
    add_speedups(results, sorted({p.name for _, provs, _, _ in plan for p in provs if p.baseline}))

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = Path(a.out) / f"{device.type}-{'+'.join(a.suite)}-{stamp}.json"
    write_json(path, env, ceil, results)
    write_csv(path.with_suffix(".csv"), results)
    plots = [] if a.no_plots else write_plots(path.parent, results, prefix=path.stem + "-")
    print_table(results, f"{env['device_name']}, {env['date_utc'][:10]}")
    print(f"written: {path}, {path.with_suffix('.csv').name}" + (f", {len(plots)} plots" if plots else ""))
    if a.compare:
        old = json.loads(Path(a.compare).read_text())
        old_dev = old.get("env", {}).get("device_name", old.get("env", {}).get("gpu", "?"))
        if old_dev != env["device_name"]:
            print(f"note: {a.compare} was measured on {old_dev}, this run on {env['device_name']}")
        lines = regressions(old, results)
        print("\n".join(lines) if lines else f"no regression > 5% against {a.compare}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
