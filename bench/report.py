"""Outputs of a run: JSON (the record), CSV, PNG plots, the terminal table, a progress bar, --compare.

matplotlib, rich and tqdm are optional: without them there are no plots, a plain table and no bar."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import sys
from pathlib import Path
from typing import Dict, List, Sequence

from .harness import Result
from .render import _rate

COLUMNS = [  # (header, field or speed-up key, format or "rate"); shared by the plain and the rich table
    ("suite", "suite", ""), ("case", "case", ""), ("dtype", "dtype", ""), ("mode", "mode", ""),
    ("provider", "provider", ""), ("status", "status", ""), ("ms p50", "ms_p50", ".3f"),
    ("p20-p80", None, ""), ("graph ms", "graph_ms_p50", ".3f"), ("GB/s", "gbps", ".1f"), ("%copy", "pct_of_copy_bw", ".1f"),
    ("TFLOP/s", "tflops", "rate"), ("%mm", "pct_of_matmul", ".1f"), ("tok/s", "tokens_per_s", ".0f"),
    ("speed-up", None, ""),
    ("extra MiB", None, ".0f"),
]


# a list of scalars as json.dumps(indent=...) writes it, an element a line (a string holds no raw newline)
_SCALAR_LIST = re.compile(r"\[\n\s*([^\[\]{}]*?)\n\s*\]")


def write_json(path: Path, env: dict, ceilings: dict, results: List[Result]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"env": env, "ceilings": ceilings, "results": [dataclasses.asdict(r) for r in results]},
                      indent=1)
    # each list on one line: a CUDA result's samples_ms holds hundreds of numbers
    path.write_text(_SCALAR_LIST.sub(lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", text))


def write_csv(path: Path, results: List[Result]) -> None:
    fields = [f.name for f in dataclasses.fields(Result) if f.name != "samples_ms"]  # the JSON has them
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in results:
            row = dataclasses.asdict(r)
            row["shape"] = json.dumps(row["shape"])
            row["speedup_vs"] = json.dumps(row["speedup_vs"])
            w.writerow(row)


# The size each suite's presets sweep (attention trades batch for length at a fixed token count: plot the length).
SWEEP = {"attention": "L", "cross_entropy": "V", "linear_cross_entropy": "V", "lstm": "T", "lstm_cell": "B"}
# Suites whose presets may vary several sizes together: plotted against their product when all of them vary.
SWEEP_PRODUCT = {"cross_entropy": ("N", "V")}


def sweep_key(suite: str, keys: tuple, rs: List[Result]) -> str:
    """The x axis of a plot: the suite's swept size when it varies across the cases, else the first key that
    varies, else the last key."""
    varies = [k for k in keys if len({r.shape.get(k) for r in rs}) > 1]
    if SWEEP.get(suite) in varies:
        return SWEEP[suite]
    return varies[0] if varies else keys[-1]


def plot_groups(results: List[Result], prefix: str = "") -> Dict[str, tuple]:
    """File name -> (title, x key, metric, results) of each plot: one per (suite, mode, dtype, shape keys) of the
    ``ok`` results. Cases with other shape keys (another model of the e2e suite) get their own plot. The names
    depend on the records only, so the README can link plots without drawing them (bench/render.py)."""
    groups: Dict[tuple, List[Result]] = {}
    for r in results:
        if r.status == "ok":
            groups.setdefault((r.suite, r.mode, r.dtype, tuple(r.shape)), []).append(r)
    out = {}
    for (suite, mode, dtype, keys), rs in groups.items():
        metric = next((m for m in ("tflops", "tokens_per_s") if getattr(rs[0], m) is not None), "gbps")
        model = rs[0].case.split()[0]  # e2e cases start with their model's name; the kernel suites with k=v
        model = "" if "=" in model else model
        name = f"{prefix}{suite}{'-' + model if model else ''}-{mode.replace('+', '_')}-{dtype}.png"
        prod = SWEEP_PRODUCT.get(suite, ())
        key = prod if len(prod) > 1 and all(len({r.shape.get(k) for r in rs}) > 1 for k in prod) \
            else (sweep_key(suite, keys, rs),)
        out[name] = (f"{suite} {model} {mode} {dtype}".replace("  ", " "), key, metric, rs)
    return out


def _x(r: Result, key: tuple) -> float:
    return math.prod(r.shape[k] for k in key)


def write_plots(directory: Path, results: List[Result], prefix: str = "") -> List[Path]:
    """One PNG per plot_groups() entry: GB/s (or TFLOP/s, tokens/s) of each provider against the swept size.
    None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = []
    for name, (title, key, metric, rs) in plot_groups(results, prefix).items():
        fig, ax = plt.subplots(figsize=(7, 4))
        for prov in sorted({r.provider for r in rs}):
            pts = sorted((_x(r, key), getattr(r, metric)) for r in rs if r.provider == prov)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=prov)
        xs = [_x(r, key) for r in rs]
        if max(xs) > 4 * min(xs):
            ax.set_xscale("log", base=2)
        ax.set_xlabel("·".join(key))
        ax.set_ylabel({"tflops": "TFLOP/s", "tokens_per_s": "tokens/s"}.get(metric, "GB/s (minimal bytes / time)"))
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
        path = directory / name
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        out.append(path)
    return out


def results_of(records: List[dict]) -> List[Result]:
    """Result objects from a run's JSON records (fields a newer or older schema has that Result lacks: ignored)."""
    fields = {f.name for f in dataclasses.fields(Result)}
    return [Result(**{k: v for k, v in r.items() if k in fields}) for r in records]


def _cells(r: Result) -> List[str]:
    f = lambda v, spec: "-" if v is None else _rate(v) if spec == "rate" else format(v, spec)  # noqa: E731
    cells = []
    for head, field, spec in COLUMNS:
        if head == "p20-p80":
            cells.append("-" if r.ms_p20 is None else f"{r.ms_p20:.3f}-{r.ms_p80:.3f}")
        elif head == "speed-up":
            cells.append(" ".join(f"{v:.2f}x {k}" for k, v in r.speedup_vs.items()) or "-")
        elif head == "extra MiB":  # measured peak, and the suite's model of it where it has one
            cell = f(None if r.peak_extra_mem_bytes is None else r.peak_extra_mem_bytes / 2**20, spec)
            if r.model_extra_mem_bytes is not None and r.peak_extra_mem_bytes is not None:
                cell += f" (model {r.model_extra_mem_bytes / 2**20:{spec}})"
            cells.append(cell)
        else:
            v = getattr(r, field)
            cells.append(str(v) if not spec else f(v, spec))
    return cells


def _grid(results: List[Result]):
    """Headers and rows, without the columns that are empty in every row (no FLOP model, no CUDA memory)."""
    rows = [_cells(r) for r in results]
    keep = [i for i, (head, _, spec) in enumerate(COLUMNS) if not spec or any(row[i] != "-" for row in rows)]
    return [COLUMNS[i] for i in keep], [[row[i] for i in keep] for row in rows]


def table(results: List[Result]) -> str:
    """The plain-text table (also what gets printed when rich is not installed)."""
    cols, rows = _grid(results)
    rows = [[c[0] for c in cols]] + rows
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines + notes(results))


def print_table(results: List[Result], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        print(table(results))
        return
    cols, rows = _grid(results)
    t = Table(title=title)
    for head, _, spec in cols:
        t.add_column(head, justify="right" if spec else "left", no_wrap=True)
    style = {"ok": None, "wrong": "red", "error": "red", "absent": "dim"}
    for r, row in zip(results, rows):
        t.add_row(*row, style=style.get(r.status))
    console = Console(width=None if sys.stdout.isatty() else 240)  # a log file would get rich's 80 columns
    console.print(t)
    for line in notes(results):
        console.print(line, markup=False)


def notes(results: List[Result]) -> List[str]:
    """What the speed-up column means; why providers were not timed (an absent provider once, not once per case
    and mode)."""
    out = []
    if any(r.speedup_vs for r in results):
        out.append("  speed-up: the named baseline's median time over this provider's (above 1: this one is faster)")
    for r in results:
        line = (f"  {r.provider}: absent: {r.error}" if r.status == "absent" else
                f"  {r.provider} [{r.case} {r.mode}] {r.status}: {r.error}")
        if r.status != "ok" and r.error and line not in out:
            out.append(line)
        if r.graph_error:
            out.append(f"  {r.provider} [{r.case} {r.mode}] not timed as a CUDA graph: {r.graph_error}")
    return out


class Progress:
    """rich's or tqdm's bar on stderr, whichever is installed; nothing otherwise."""

    def __init__(self, total: int):
        self._rich = self._tqdm = None
        try:
            from rich.console import Console
            from rich.progress import Progress as RichProgress
            self._rich = RichProgress(console=Console(stderr=True), transient=True)
            self._task = self._rich.add_task("bench", total=total)
            self._rich.start()
            return
        except ImportError:
            pass
        try:
            from tqdm import tqdm
            self._tqdm = tqdm(total=total, leave=False, file=sys.stderr)
        except ImportError:
            pass

    def describe(self, text: str) -> None:
        if self._rich:
            self._rich.update(self._task, description=text)
        elif self._tqdm:
            self._tqdm.set_description(text)

    def advance(self, n: int = 1) -> None:
        if self._rich:
            self._rich.advance(self._task, n)
        elif self._tqdm:
            self._tqdm.update(n)

    def close(self) -> None:
        if self._rich:
            self._rich.stop()
        elif self._tqdm:
            self._tqdm.close()


def regressions(old_run: dict, results: Sequence[Result], threshold: float = 1.05) -> List[str]:
    """Lines for every (suite, case, dtype, provider, mode) more than 5% slower than in an earlier run's JSON, or
    no longer ok. Times are only comparable on the same device: the caller prints both runs' devices."""
    old = {(o["suite"], o["case"], o["dtype"], o["provider"], o["mode"]): o for o in old_run["results"]}
    out = []
    for r in results:
        o = old.get((r.suite, r.case, r.dtype, r.provider, r.mode))
        if o is None:
            continue
        where = f"{r.suite} {r.case} {r.dtype} {r.mode} {r.provider}"
        if o.get("status") == "ok" and r.status != "ok":
            out.append(f"REGRESSION {where}: was ok, now {r.status}: {r.error}")
        elif o.get("ms_p50") and r.ms_p50 and r.ms_p50 > threshold * o["ms_p50"]:
            out.append(f"REGRESSION {where}: {o['ms_p50']:.3f} -> {r.ms_p50:.3f} ms "
                       f"(+{100 * (r.ms_p50 / o['ms_p50'] - 1):.1f}%)")
    return out
