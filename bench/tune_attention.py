"""Measure the Triton attention kernels' tiles on this GPU and record the winners for the launcher.

    python -m bench.tune_attention [--head-dims 64,128] [--seqlen 4096] [--out DIR] [--write]

For each head dim, causal and not, and each kernel (forward, dQ, dK/dV), every candidate tile (BLOCK_M, BLOCK_N,
num_warps, num_stages) that fits the head dim (the autotuner's pruning) is launched on FlashAttention's benchmark
shape (bf16, batch * seqlen = 16k, heads * head dim = 2048) through the launcher's TILE_OVERRIDE, timed with
triton.testing.do_bench (median), and the fastest kept; the table's current choice is timed too, so the file says
what the change buys. A candidate that does not compile or launch (shared memory, registers) is recorded as such.
Commit the measurements under bench/results/tuning/ (bench/results/*.json are the harness's files, which the
README renderer reads).
The backward kernels are timed through the whole backward with the other kernel at its current tile: the two run
one after the other, so the difference is this kernel's. Outputs: the full measurements as JSON under --out, and
with --write the winners into pykernels/triton/attention_tiles.json under this GPU's architecture (sm_XY), which
the launcher reads at import (16-bit inputs only; fp32 keeps the table)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
from typing import Dict, List, Optional, Sequence, Tuple

import torch

Tile = Tuple[int, int, int, int]

# Hand-picked around the table's choice, FlashAttention-2's and the Triton tutorial's tiles (a full sweep of the
# autotuner's space compiles ~100 variants per kernel: minutes of a short GPU lease).
CANDIDATES: Dict[str, List[Tile]] = {
    "fwd": [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3), (64, 128, 4, 3),
            (128, 64, 8, 4), (128, 128, 8, 2)],
    "dq": [(64, 32, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3),
           (32, 32, 4, 2)],
    "dkdv": [(32, 64, 8, 2), (32, 64, 4, 2), (64, 64, 8, 2), (32, 128, 4, 2), (64, 128, 8, 2), (32, 128, 8, 3),
             (16, 64, 4, 2), (16, 128, 8, 2)],
}


def fits(tile: Tile, E: int) -> bool:
    """The autotuner's pruning rule (pykernels.triton.attention._prune) for one candidate."""
    import triton

    from pykernels.triton import attention as ta
    bm, bn, warps, stages = tile
    cfg = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
    # _prune never returns an empty list (it keeps the first config then): a tile that always fits goes first
    tiny = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
    return cfg in ta._prune([tiny, cfg], {}, E=E, EV=E)


def candidates(kind: str, E: int, current: Tile) -> List[Tile]:
    """The kind's candidates that fit head dim E, the current choice first (always timed)."""
    out = [tuple(current)]
    for t in CANDIDATES[kind]:
        if t not in out and fits(t, E):
            out.append(t)
    return out


def merge(tiles: dict, arch: str, device: str, stamp: dict, winners: Dict[str, dict]) -> dict:
    """tiles (the attention_tiles.json content) with this run's winners under ``arch``; entries of other keys and
    architectures are kept."""
    out = json.loads(json.dumps(tiles))
    slot = out.setdefault(arch, {"entries": {}})
    slot.update({"device": device, **stamp})
    slot.setdefault("entries", {}).update(winners)
    return out


def _stamp() -> dict:
    import triton
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        commit = None
    return {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "triton": triton.__version__,
            "commit": commit}


def _time(fn) -> float:
    import triton.testing
    ms = triton.testing.do_bench(fn, warmup=10, rep=50, quantiles=[0.5])
    return float(ms[0] if isinstance(ms, (list, tuple)) else ms)


def _problem(E: int, seqlen: int, causal: bool):
    """FlashAttention's benchmark shape at head dim E and the step of each kernel kind on it."""
    from pykernels.ops import attention as ops
    fwd, bwd = ops.KERNELS["triton"]
    dev = torch.device("cuda")
    B, H = max(1, 16384 // seqlen), max(1, 2048 // E)
    q, k, v, do = (torch.randn(B, H, seqlen, E, device=dev, dtype=torch.bfloat16) for _ in range(4))
    args = (None, None, None, seqlen, seqlen, E ** -0.5, causal, 0, False, -1, -1, 0.0, 0.0, None)
    o, lse, lse_lo = fwd(q, k, v, *args)
    steps = {"fwd": lambda: fwd(q, k, v, *args), "dq": lambda: bwd(do, q, k, v, o, lse, lse_lo, *args, False)}
    steps["dkdv"] = steps["dq"]
    return (B, H, seqlen, E), steps


def _warm(job) -> Optional[str]:
    """One candidate's first launch in a worker process: Triton compiles it into its on-disk cache, where the timing
    process then finds it (same shapes, so the same specialisation). Returns the error, if any."""
    E, seqlen, causal, kind, tile = job
    from pykernels.triton import attention as ta
    ta.TILE_OVERRIDE[kind] = tile
    try:
        _problem(E, seqlen, causal)[1][kind]()
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 - reported by the timing pass
        return f"{type(e).__name__}: {str(e)[:120]}"


def precompile(jobs: List[tuple], workers: int) -> None:
    """Compile every candidate in ``workers`` processes (a compile is single-threaded and takes seconds)."""
    import concurrent.futures as cf
    import multiprocessing as mp
    if workers <= 1 or not jobs:
        return
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        for job, err in zip(jobs, pool.map(_warm, jobs)):
            if err:
                print(f"  compile {job}: {err}")


def tune(head_dims: Sequence[int], seqlen: int, kinds: Sequence[str], workers: int = 1
         ) -> Tuple[Dict[str, dict], List[dict]]:
    from pykernels.triton import attention as ta
    dev = torch.device("cuda")
    # (E, causal, kind) -> the tiles to time, the table's first
    plan = {(E, causal, kind): candidates(kind, E, ta.config(E, E, torch.bfloat16, kind, dev, causal))
            for E in head_dims for causal in (False, True) for kind in kinds}
    precompile([(E, seqlen, causal, kind, tile) for (E, causal, kind), tiles in plan.items() for tile in tiles],
               workers)
    winners, rows = {}, []
    for E in head_dims:
        for causal in (False, True):
            (B, H, _, _), steps = _problem(E, seqlen, causal)
            for kind in kinds:
                tiles = plan[(E, causal, kind)]
                current = tiles[0]
                step = steps[kind]
                times: Dict[Tile, Optional[float]] = {}
                for tile in tiles:
                    ta.TILE_OVERRIDE[kind] = tile
                    try:
                        times[tile] = _time(step)
                    except Exception as e:  # noqa: BLE001 - out of resources and the like: recorded, not fatal
                        times[tile] = None
                        print(f"  {kind} E={E} causal={causal} {tile}: {type(e).__name__}: {str(e)[:120]}")
                    finally:
                        ta.TILE_OVERRIDE.pop(kind, None)
                ok = {t: ms for t, ms in times.items() if ms is not None}
                best = min(ok, key=ok.get)
                table_ms = times[current]
                key = ta.tile_key(kind, E, E, causal)
                winners[key] = {"tile": list(best), "ms": round(ok[best], 4),
                                "table_ms": None if table_ms is None else round(table_ms, 4),
                                "shape": [B, H, seqlen, E]}
                rows.append({"key": key, "shape": [B, H, seqlen, E], "current": list(current),
                             "times": [[list(t), ms] for t, ms in times.items()]})
                gain = table_ms / ok[best] if table_ms else float("nan")
                print(f"{key:22} best {best} {ok[best]:.3f} ms, table {current} "
                      f"{table_ms or float('nan'):.3f} ms ({gain:.2f}x)", flush=True)
    return winners, rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.tune_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--kinds", default="fwd,dq,dkdv")
    p.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1), help="compile processes")
    p.add_argument("--out", default=None, help="directory for the full measurements (JSON)")
    p.add_argument("--write", action="store_true", help="record the winners in pykernels/triton/attention_tiles.json")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("tune_attention needs a CUDA GPU (tiles are a property of the GPU)")
    from pykernels.triton import attention as ta
    dev = torch.device("cuda")
    arch = ta._arch(dev)
    name = torch.cuda.get_device_name(dev)
    winners, rows = tune([int(e) for e in a.head_dims.split(",")], a.seqlen, a.kinds.split(","), a.jobs)
    stamp = _stamp()
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        slug = "-".join(w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w != "nvidia")
        path = os.path.join(a.out, f"tiles-{slug}-attention-{stamp['date'].replace('-', '')}.json")
        with open(path, "w") as f:
            json.dump({"device": name, "arch": arch, **stamp, "winners": winners, "measurements": rows}, f, indent=1)
        print("wrote", path)
    if a.write:
        tiles = merge(ta.load_tiles(), arch, name, stamp, winners)
        with open(ta.TILES_FILE, "w") as f:
            json.dump(tiles, f, indent=1, sort_keys=True)
        print("wrote", ta.TILES_FILE)


if __name__ == "__main__":
    main()
