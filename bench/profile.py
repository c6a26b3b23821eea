"""Kernel-level view of one benchmark step: which kernels a provider launches, and their times.

    python -m bench.profile --suite attention --providers pykernels-cuda,pykernels-triton,torch
    ncu --profile-from-start off --clock-control none python -m bench.profile --suite attention \
        --providers pykernels-cuda --modes fwd --ncu

For each (case, mode, provider) of the suite's quick preset (or --shape): the step is built and checked exactly as
the benchmark does (bench/harness.py prepare), warmed up, then run once under torch.profiler, which prints the
kernels by device time and the step's peak extra memory. --ncu instead runs one step between cudaProfilerStart and
Stop, so that Nsight Compute (started with --profile-from-start off) profiles that step's kernels alone. The first
thing to read when a measured time misses the FLOP or byte model."""
from __future__ import annotations

import argparse

import torch

from . import SUITES, load_suite
from .__main__ import DTYPES, _check_names, _device, _names, _shape, suite_cases
from .harness import ReferenceFailed
from .timing import peak_extra_memory


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.profile")
    p.add_argument("--suite", required=True, choices=list(SUITES))
    p.add_argument("--shape", help="one shape instead of the quick preset, as for python -m bench")
    p.add_argument("--providers", required=True, help="provider names as the benchmark prints them")
    p.add_argument("--modes", default=None, help="default: every mode of the suite")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--ncu", action="store_true", help="one more step inside cudaProfilerStart/Stop")
    p.add_argument("--rows", type=int, default=12)
    p.add_argument("--device", default="cuda", help="cpu: the same view of CPU ops (a smoke test of this script)")
    a = p.parse_args(argv)
    # python -m bench's checks (an argparse error, not a traceback from deep in the run or a step of a mode the
    # suite does not have)
    device = _device(p, a.device)
    cuda = device.type == "cuda"
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = DTYPES[a.dtype]
    suite = load_suite(a.suite)
    modes = _names(a.modes)
    _check_names(p, "--modes", modes, set(suite.MODES), set(suite.MODES), device)
    try:
        cases = suite_cases(suite, a.suite, device, dtype, True, _shape(a.shape) if a.shape else None)
    except ValueError as e:
        p.error(f"--shape {a.shape}: {e}")
    wanted = a.providers.split(",")
    provs = {pr.name: pr for pr in suite.providers(device, dtype) if pr.name in wanted}
    missing = [n for n in wanted if n not in provs]
    if missing:
        raise SystemExit(f"unknown providers for {a.suite}: {missing}")
    modes = modes or list(suite.MODES)
    for case in cases:
        args0, diff = case.inputs()
        ref = case.reference(args0)
        if isinstance(ref, ReferenceFailed):
            raise SystemExit(ref.message)
        for mode in modes:
            for name in wanted:
                prov = provs[name]
                if prov.absent or prov.fn is None:
                    print(f"=== {case.name} {mode} {name}: absent ({prov.absent})")
                    continue
                step, leaves, errs = case.prepare(prov, mode, args0, diff, ref)
                for _ in range(3):
                    step()
                    for t in leaves:
                        t.grad = None
                sync()
                if a.ncu and cuda:  # Nsight Compute alone: torch.profiler's CUPTI session would compete with it
                    torch.cuda.profiler.start()
                    step()
                    sync()
                    torch.cuda.profiler.stop()
                    print(f"=== {case.name} {mode} {name}: one step profiled for ncu")
                    continue
                with torch.profiler.profile(activities=[activity]) as prof:
                    step()
                    sync()
                for t in leaves:
                    t.grad = None
                extra = peak_extra_memory(step, device)
                mem = f", peak extra {extra / 2**20:.0f} MiB" if extra is not None else ""
                print(f"=== {case.name} {mode} {name}: normalised error {errs[1]:.2e}{mem}")
                sort = "cuda_time_total" if cuda else "cpu_time_total"
                print(prof.key_averages().table(sort_by=sort, row_limit=a.rows,
                                                max_name_column_width=90))


if __name__ == "__main__":
    main()
