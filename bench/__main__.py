"""`python -m bench` / `pykernels-bench`: every suite, every provider, side by side in one run."""
from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from pathlib import Path

import torch

from . import cross_entropy, harness

SUITES = {"cross_entropy": cross_entropy}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="pykernels-bench", description=__doc__)
    p.add_argument("--suite", nargs="*", default=list(SUITES), choices=list(SUITES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--quick", action="store_true", help="one shape per suite, short timing")
    p.add_argument("--providers", default="*", help="glob over provider names, e.g. 'pykernels-*,torch'")
    p.add_argument("--out", default="bench/out", help="directory for the JSON file")
    p.add_argument("--compare", default=None, help="an earlier JSON: print regressions > 5%%")
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if device.type != "cuda":
        print("No GPU: benchmarking the CPU providers only.")
    env = harness.environment(device)
    ceil = harness.ceilings(device, quick=a.quick)
    print(json.dumps({"env": env, "ceilings": ceil}))
    globs = a.providers.split(",")
    select = lambda name: any(fnmatch.fnmatch(name, g) for g in globs)  # noqa: E731
    results = []
    for s in harness.progress(a.suite, "suites"):
        results += SUITES[s].run(device, dtype, a.quick, select)
    results = [harness.finish(r, ceil) for r in results]
    harness.add_speedups(results)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(a.out) / f"{device.type}-{stamp}.json"
    harness.write_json(path, env, ceil, results)
    harness.write_csv(path.with_suffix(".csv"), results)
    plots = [] if a.no_plots else harness.write_plots(path.parent, results)
    print(harness.table(results))
    print(f"written: {path} (+ .csv{', ' + str(len(plots)) + ' plots' if plots else ''})")
    if a.compare:
        for line in regressions(json.loads(Path(a.compare).read_text()), results):
            print(line)
    return 0


def regressions(old_run: dict, results, threshold: float = 1.05):
    """Lines for every (suite, case, provider, mode) more than 5% slower than in an earlier run's JSON."""
    old = {(r["suite"], r["case"], r["provider"], r["mode"]): r for r in old_run["results"]}
    out = []
    for r in results:
        o = old.get((r.suite, r.case, r.provider, r.mode))
        if o and o.get("ms_p50") and r.ms_p50 and r.ms_p50 > threshold * o["ms_p50"]:
            out.append(f"REGRESSION {r.suite} {r.case} {r.provider}: {o['ms_p50']:.3f} -> {r.ms_p50:.3f} ms")
    return out


if __name__ == "__main__":
    sys.exit(main())
