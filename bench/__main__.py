"""`python -m bench`: every suite, every provider, side by side in one run.

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
from .harness import Provider, add_speedups, check_shape_values, derive, run_suite
from .render import _rate
from .report import Progress, print_table, regressions, write_csv, write_json, write_plots
from .timing import ceilings

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _names(text: Optional[str]) -> Optional[List[str]]:
    return None if text is None else [s.strip() for s in text.split(",") if s.strip()]


def _shape(text: str) -> dict:
    out = {}
    for item in text.split(","):
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"{item!r} is not KEY=VALUE")
        try:
            out[k.strip()] = int(v)
        except ValueError:
            raise ValueError(f"{k.strip()}={v.strip()!r}: the value must be an integer") from None
    return out


def _check_shape(suite, name: str, shape: dict) -> None:
    """Against the suite's SHAPE_KEYS (required, optional), where it declares them (attention and e2e check their
    own, more varied keys when they build the cases)."""
    keys = getattr(suite, "SHAPE_KEYS", None)
    if keys is None:
        return
    required, optional = keys
    missing = [k for k in required if k not in shape]
    unknown = sorted(set(shape) - set(required) - set(optional))
    if missing or unknown:
        raise ValueError(f"suite {name} takes {','.join(required)}" + (f"[,{','.join(optional)}]" if optional else "")
                         + (f"; missing {','.join(missing)}" if missing else "")
                         + (f"; unknown {','.join(unknown)}" if unknown else ""))
    check_shape_values(shape, sizes=required)


def suite_cases(suite, name: str, device: torch.device, dtype: torch.dtype, quick: bool, shape: Optional[dict]):
    """The suite's cases for --shape (checked) or its preset; ValueError naming what is wrong with the shape."""
    if shape is not None:
        _check_shape(suite, name, shape)
    return suite.cases(device, dtype, quick, shape=shape)


def _load(env: dict) -> str:
    return f"load average {env['load_avg']:.1f} on {env.get('cores')} cores"


def _device(p: argparse.ArgumentParser, text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        p.error(f"--device {text!r}: expected 'cpu' or 'cuda[:N]'")
    if device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index not in (None, 0)):
        p.error(f"--device {text!r}: expected 'cpu' or 'cuda[:N]'")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        p.error(f"--device {text!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def _check_names(p: argparse.ArgumentParser, flag: str, names: Optional[List[str]], here: set,
                 anywhere: set, device: torch.device, absent: set = frozenset()) -> None:
    """A name no suite has is a typo: an error. One that only other suites have (a list shared by several runs, e.g.
    gpu_check.sh's BENCH_ARGS) is noted and skipped. ``absent``: the names that cannot run on this device."""
    names = set(names or ())
    if names - anywhere:
        runs, cannot = sorted(anywhere - absent), sorted(anywhere & absent)
        p.error(f"{flag}: unknown {', '.join(sorted(names - anywhere))}; on {device.type} the suites have "
                f"{', '.join(runs) or 'none'}" + (f" (and {', '.join(cannot)}, which cannot run on {device.type}: "
                                                  "reported absent)" if cannot else ""))
    if names - here:
        print(f"note: {flag} {', '.join(sorted(names - here))}: not in the suites run here, skipped")


def _provider_names(device: torch.device, dtype: torch.dtype, suites) -> tuple:
    """(pykernels backends, baselines, those of both absent in every suite) of these suites' providers here."""
    provs = [q for s in suites for q in s.providers(device, dtype)]
    name = lambda q: q.name[len("pykernels-"):] if q.name.startswith("pykernels-") else q.name  # noqa: E731
    return ({name(q) for q in provs if q.name.startswith("pykernels-")}, {q.name for q in provs if q.baseline},
            {name(q) for q in provs} - {name(q) for q in provs if not q.absent})


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
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", nargs="+", default=list(SUITES), choices=list(SUITES),
                   help="default: every registered suite")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="'cpu' or 'cuda[:N]' (default: cuda when torch sees a GPU)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--quick", action="store_true", help="one shape per suite (e2e: one per workload), short "
                   "timing (every suite: about 2 minutes on a 2-core CPU)")
    p.add_argument("--backends", default=None, help="pykernels backends, e.g. 'cuda,triton' (default: those "
                   "that target the device; 'reference' only when named)")
    p.add_argument("--baselines", default=None, help="e.g. 'torch,torch.compile,liger' (default: all; '' none)")
    p.add_argument("--modes", default=None, help="e.g. 'fwd+bwd' (default: every mode of the suite)")
    p.add_argument("--shape", default=None, help="one shape instead of the preset, with exactly one --suite, e.g. "
                   "'N=4096,V=50257' (cross_entropy), 'B=4,H=16,L=2048,E=128,causal=1' (attention), "
                   "'B=8,T=256,steps=20' (e2e: sets those fields in each of its workloads char-lstm, gpt and "
                   "hf-gpt2 that has them)")
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
    device = _device(p, a.device)
    dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # everything checked before the first timing: a typo must not cost a run, nor a bad path its results
    backends, baselines, modes = _names(a.backends), _names(a.baselines), _names(a.modes)
    shape = None
    plan = []
    try:
        shape = _shape(a.shape) if a.shape else None
        for name in a.suite:
            suite = load_suite(name)
            if a.preset is not None:  # a named grid: each of its shapes as if passed by --shape
                cases = [c for s in suite.NAMED_PRESETS[a.preset] for c in suite.cases(device, dtype, a.quick, s)]
            else:
                cases = suite_cases(suite, name, device, dtype, a.quick, shape)
            plan.append((suite, suite.providers(device, dtype), cases, list(suite.MODES)))
    except ValueError as e:
        p.error(f"--shape {a.shape}: {e}" if a.shape else str(e))
    here = _provider_names(device, dtype, [s for s, _, _, _ in plan])
    anywhere = _provider_names(device, dtype, [load_suite(n) for n in SUITES]) if backends or baselines else here
    _check_names(p, "--backends", backends, here[0], anywhere[0], device, anywhere[2])
    _check_names(p, "--baselines", baselines, here[1], anywhere[1], device, anywhere[2])
    modes_here = {m for _, _, _, ms in plan for m in ms}
    _check_names(p, "--modes", modes, modes_here, {m for n in SUITES for m in load_suite(n).MODES} if modes
                 else modes_here, device)
    plan = [(suite, select(provs, backends, baselines), cases, [m for m in ms if modes is None or m in modes])
            for suite, provs, cases, ms in plan]
    if not any(provs and cases and ms for _, provs, cases, ms in plan):  # the filters left nothing: no empty run
        names = ", ".join(s.NAME for s, _, _, _ in plan)
        if not any(ms for _, _, _, ms in plan):
            p.error(f"--modes {a.modes}: nothing to run, {names} "
                    f"{'has' if len(plan) == 1 else 'have'} only {', '.join(sorted(modes_here))}")
        if not any(provs for _, provs, _, _ in plan):
            given = " ".join(f"{f} {v!r}" for f, v in (("--backends", a.backends), ("--baselines", a.baselines))
                             if v is not None)
            p.error(f"{given}: nothing to run, no provider of {names} selected")
        p.error(f"nothing to run: no suite of {names} has both a selected provider and a selected mode")
    old = None
    if a.compare:
        try:
            old = json.loads(Path(a.compare).read_text())
            if not isinstance(old, dict) or not isinstance(old.get("results"), list):
                raise ValueError("not a benchmark JSON (no 'results' list)")
        except (OSError, ValueError) as e:
            p.error(f"--compare {a.compare}: {e}")
    try:
        Path(a.out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"--out {a.out}: {e}")
    if device.type != "cuda":
        why = "no CUDA GPU on this machine" if not torch.cuda.is_available() else "--device " + a.device
        print(f"CPU run ({why}): benchmarking the CPU providers only; GPU numbers come from a GPU machine.")
    env = environment(device)
    ceil = ceilings(device, (dtype,), quick=a.quick)
    threads = f" | {torch.get_num_threads()} CPU threads" if device.type == "cpu" else ""
    if device.type == "cpu" and env["busy"]:
        print(f"note: this machine is busy ({_load(env)}): CPU times will be noisy, and a provider sharing a core "
              "with another process can read many times slower")
    print(f"{env['device_name']}{threads} | torch {env['torch']} | triton {env['triton']} | CUDA {env['cuda']} | "
          f"commit {env['git_commit'][:10]} | {env['date_utc']}")
    print("measured ceilings: " + ", ".join(f"{k} {_rate(v)}" for k, v in ceil.items() if isinstance(v, float)))

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
    if old is not None:
        old_env = old.get("env", {})
        old_dev = old_env.get("device_name", old_env.get("gpu", "?"))
        if old_dev != env["device_name"]:
            print(f"note: {a.compare} was measured on {old_dev}, this run on {env['device_name']}")
        busy = [f"{what} ({_load(e)})" for what, e in ((a.compare, old_env), ("this run", env)) if e.get("busy")]
        if busy:
            print(f"note: {' and '.join(busy)} ran on a busy machine: CPU times are noisy, a difference may be the "
                  "load's")
        lines = regressions(old, results)
        common = len({(o.get("suite"), o.get("case"), o.get("dtype"), o.get("provider"), o.get("mode"))
                      for o in old["results"]} & {(r.suite, r.case, r.dtype, r.provider, r.mode) for r in results})
        print("\n".join(lines) if lines else
              f"no regression > 5% against {a.compare} ({common} results in common)" if common else
              f"nothing to compare: {a.compare} has no result of this run's cases, providers and modes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
