"""Render the measured files of bench/results/ as markdown: the result sections of README.md and docs/results.md.

- ``*.json`` (``python -m bench``): one table per (file, suite), headed by its device, date, versions, commit and
  measured ceilings; columns that are empty in every row of a table (no FLOP model, no CUDA memory) are left out.
- ``*.jsonl`` (the retired ``bench/quick_gpu.py``: an ``_about`` line, then one line per case): one table per
  (file, family), headed by the file's device and date (the date is the one in the file name) and its ``_about``.

Generated sections sit between ``<!-- results:<name>:begin -->`` and ``<!-- results:<name>:end -->``: README.md's
``headline`` (one row per op, machine, dtype and provider over every file: median and range of the speed-up over the
baseline), docs/results.md's ``summary`` (one line per file and suite: ours' time over the baseline's, as ranges over
its cases) and ``tables`` (every table above). `python -m bench.render --readme` rewrites both files (or the one
named), `--check` exits 1 when one differs from what the committed files give. Nothing in those sections is typed by
hand.

Plots: `--plots` draws each JSON file's plots (bench/report.py, needs matplotlib) into
``bench/results/plots/<file name>/``; the tables section links every plot of a suite that exists there, so the
README and the committed PNGs come from the same records.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PLOTS = "plots"  # under the results directory: one folder per JSON file
README = REPO / "README.md"
RESULTS_DOC = REPO / "docs" / "results.md"
GENERATED = (README, RESULTS_DOC)  # the files --readme / --check handle when none is named
DASH = "–"


def _fmt(v, spec: str) -> str:
    return DASH if v is None else format(v, spec)


def _rate(v) -> str:
    """Three significant digits without an exponent: 2094, 62.7, 1.31."""
    if v is None:
        return DASH
    return format(v, f".{max(0, 2 - int(math.floor(math.log10(abs(v))))) if v else 0}f")


def _device(env: dict) -> str:
    name = env.get("device_name") or env.get("gpu") or env.get("cpu") or env.get("device", "?")
    ours = env.get("pykernels_cpu_kernels")  # a run with our CPU kernels below torch's level says so
    return name if ours in (None, env.get("cpu_capability")) else f"{name}, pykernels' CPU kernels at {ours}"


def _name(path: Path):
    return path.relative_to(REPO) if path.resolve().is_relative_to(REPO) else path


def _table(header: List[str], rows: List[List[str]], always: int = 0) -> List[str]:
    """Markdown lines; a column after the first ``always`` ones is dropped when every row has DASH in it."""
    keep = [i for i in range(len(header)) if i < always or any(row[i] != DASH for row in rows)]
    lines = ["| " + " | ".join(header[i] for i in keep) + " |", "|" + "---|" * len(keep)]
    return lines + ["| " + " | ".join(row[i] for i in keep) + " |" for row in rows]


# ---------------------------------------------------------------------------------------------------------
# JSON runs of the harness

COLUMNS: List[Tuple[str, Callable[[dict], str]]] = [
    ("case", lambda r: r["case"]),
    ("dtype", lambda r: r["dtype"]),
    ("mode", lambda r: r["mode"]),
    ("provider", lambda r: r["provider"] + ("" if r["status"] == "ok" else f" ({r['status']})")),
    ("ms (p50)", lambda r: _fmt(r.get("ms_p50"), ".3f")),
    ("p20–p80", lambda r: DASH if r.get("ms_p20") is None else f"{r['ms_p20']:.3f}–{r['ms_p80']:.3f}"),
    ("GB/s", lambda r: _rate(r.get("gbps"))),
    ("% copy BW", lambda r: _fmt(r.get("pct_of_copy_bw"), ".1f")),
    ("TFLOP/s", lambda r: _rate(r.get("tflops"))),
    ("% matmul", lambda r: _fmt(r.get("pct_of_matmul"), ".1f")),
    ("tokens/s", lambda r: _rate(r.get("tokens_per_s"))),
    ("speed-up", lambda r: ", ".join(f"{v:.2f}× {k}" for k, v in r.get("speedup_vs", {}).items()) or DASH),
    ("extra memory MiB", lambda r: _fmt(None if r.get("peak_extra_mem_bytes") is None
                                        else r["peak_extra_mem_bytes"] / 2**20, ".0f")),
]


def render_file(path: Path, base: Path = REPO) -> str:
    d = json.loads(path.read_text())
    env, ceil = d["env"], d.get("ceilings", {})
    tables = []
    for suite in dict.fromkeys(r["suite"] for r in d["results"]):  # first-seen order
        rs = [r for r in d["results"] if r["suite"] == suite]
        head = (f"**{suite}** on **{_device(env)}**, {env['date_utc'][:10]} — torch {env.get('torch')}, "
                f"triton {env.get('triton')}, CUDA {env.get('cuda')}, driver {env.get('driver', DASH)}, commit "
                f"`{env.get('git_commit', 'unknown')[:10]}`{' + uncommitted changes' if env.get('git_dirty') else ''}; "
                f"measured ceilings: copy {_rate(ceil.get('copy_gbps'))} GB/s"
                + "".join(f", {m.group(1)} matmul {_rate(v)} TFLOP/s" for k, v in ceil.items()
                          for m in [re.fullmatch(r"matmul_(\w+)_tflops", k)] if m)  # per dtype; old files bf16 only
                + f" (`{_name(path)}`)")
        rows = [[cell(r) for _, cell in COLUMNS] for r in rs if r["status"] != "absent"]
        lines = [head, ""] + _table([h for h, _ in COLUMNS], rows, always=5)
        absent = sorted({f"{r['provider']}: {r['error']}" for r in rs if r["status"] == "absent"})
        if absent:
            lines += ["", "Not measured: " + "; ".join(absent)]
        links = _plot_links(path, rs, base)
        if links:
            lines += ["", "Plots: " + " · ".join(links)]
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def _plot_dir(path: Path) -> Path:
    return path.parent / PLOTS / path.stem


def _plot_links(path: Path, records: List[dict], base: Path = REPO) -> List[str]:
    """Markdown links, relative to the folder ``base`` of the file that holds them, to the committed plots of these
    records (those present in the file's plot folder)."""
    from .report import plot_groups, results_of
    folder = _plot_dir(path)
    return [f"[{title.split(' ', 1)[1]}]({Path(os.path.relpath(folder / name, base)).as_posix()})"
            for name, (title, *_) in plot_groups(results_of(records)).items() if (folder / name).exists()]


def write_all_plots(results_dir: Path = RESULTS) -> List[Path]:
    """Every JSON file's plots into its plot folder (stale PNGs there removed first)."""
    from .report import results_of, write_plots
    out = []
    for f in sorted(results_dir.glob("*.json")):
        folder = _plot_dir(f.resolve())
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink()
        written = write_plots(folder, results_of(json.loads(f.read_text())["results"]))
        if not written:
            raise RuntimeError("drawing plots needs matplotlib (pip install matplotlib)")
        out += written
    return out


# ---------------------------------------------------------------------------------------------------------
# JSONL files of the retired bench/quick_gpu.py (in git history)

def _read_jsonl(path: Path) -> Tuple[str, str, str, List[dict]]:
    """(about, device, date, case records) of a quick_gpu file; the date comes from the file name."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    about = next((r["_about"] for r in records if "_about" in r), "")
    m = re.search(r"(\d{4})(\d{2})(\d{2})", path.stem)
    if not m:
        raise ValueError(f"{path.name}: a results file name must carry its date, <device>-<what>-YYYYMMDD.jsonl")
    # the device: "<command>; <device> (driver ...)" in _about, else the file name's first word
    dev = re.search(r";\s*([^;(]+?)\s*\(driver", about)
    device = dev.group(1) if dev else path.stem.split("-")[0]
    return about, device, "-".join(m.groups()), [r for r in records if "family" in r]


def _cell(v) -> str:
    if isinstance(v, str):
        return v.replace("torch.", "")
    return json.dumps(v)  # numbers exactly as the file has them; true/false


def render_jsonl(path: Path) -> str:
    about, device, date, records = _read_jsonl(path)
    tables = []
    for family in dict.fromkeys(r["family"] for r in records):
        rs = [r for r in records if r["family"] == family]
        cols = [k for k in dict.fromkeys(k for r in rs for k in r) if k not in ("family", "dispatch")]
        rows = [[_cell(r[k]) if k in r else DASH for k in cols] for r in rs]
        head = f"**{family}** on **{device}**, {date} — {about} (`{_name(path)}`)"
        tables.append("\n".join([head, ""] + _table(cols, rows, always=len(cols))))
    return "\n\n".join(tables)


# <provider>_<metric> keys of quick_gpu records that summary() compares, pykernels against each other provider
METRICS = {"fwdbwd_ms": "forward+backward time", "fwd_ms": "forward time", "peak_extra_mib": "peak extra memory"}


def _against_others(r: dict, metric: str) -> Iterator[Tuple[str, float, float]]:
    """(other provider, pykernels' value, its value) for each ``<other>_<metric>`` key of a quick_gpu record,
    where both are numbers and the other's is positive (a ratio's denominator)."""
    suffix = "_" + metric
    ours = r.get("pykernels" + suffix)
    if not isinstance(ours, (int, float)):
        return
    for k, theirs in r.items():
        if k.endswith(suffix) and not k.startswith("pykernels") and isinstance(theirs, (int, float)) and theirs > 0:
            yield k[:-len(suffix)], ours, theirs


def _ratio_ranges(rs: List[dict]) -> List[str]:
    """'<metric> lo–hi× <other>'s': pykernels' value over the other provider's, the range over the cases."""
    out = []
    for metric, label in METRICS.items():
        ratios: Dict[str, List[float]] = {}
        for r in rs:
            for other, ours, theirs in _against_others(r, metric):
                ratios.setdefault(other, []).append(ours / theirs)
        for other, rr in ratios.items():
            rr.sort()
            span = f"{rr[0]:.2f}" if len(rr) == 1 else f"{rr[0]:.2f}–{rr[-1]:.2f}"
            out.append(f"{label} {span}× {other}'s")
    return out


MODE_NAMES = {"fwd+bwd": "forward+backward", "fwd": "forward", "bwd": "backward", "train": "training step"}


def _span(ratios: List[float]) -> str:
    lo, hi = f"{min(ratios):.2f}", f"{max(ratios):.2f}"
    return lo if lo == hi else f"{lo}–{hi}"


def _torch_pairs(results: List[dict]) -> List[Tuple[dict, dict]]:
    """(record of ours, torch's record of the same suite, case, mode and dtype) for every ok record of a pykernels
    provider that has one: what the summary and the headline compare."""
    ok = [r for r in results if r["status"] == "ok"]
    torch_of = {(r["suite"], r["case"], r["mode"], r["dtype"]): r for r in ok if r["provider"] == "torch"}
    return [(r, torch_of[key]) for r in ok if r["provider"].startswith("pykernels")
            for key in [(r["suite"], r["case"], r["mode"], r["dtype"])] if key in torch_of]


def _json_summary(path: Path) -> List[str]:
    """One line per suite of a harness JSON file: each pykernels provider's time over torch's (the ``torch``
    baseline every suite has), per mode, the range over the cases, and its peak extra memory over torch's."""
    d = json.loads(path.read_text())
    compared = _torch_pairs(d["results"])
    lines = []
    for suite in dict.fromkeys(r["suite"] for r in d["results"]):
        rs = [r for r in d["results"] if r["suite"] == suite and r["status"] == "ok"]
        parts = []
        for prov in dict.fromkeys(r["provider"] for r in rs if r["provider"].startswith("pykernels")):
            times, mems = [], []
            for mode in dict.fromkeys(r["mode"] for r in rs):
                pairs = [(r, t) for r, t in compared if r["suite"] == suite and r["provider"] == prov
                         and r["mode"] == mode]
                ratios = [r["ms_p50"] / t["ms_p50"] for r, t in pairs if r.get("ms_p50") and t.get("ms_p50")]
                if ratios:
                    times.append(f"{MODE_NAMES.get(mode, mode)} time {_span(ratios)}×")
                mems += [r["peak_extra_mem_bytes"] / t["peak_extra_mem_bytes"] for r, t in pairs
                         if mode == "fwd+bwd" and r.get("peak_extra_mem_bytes") and t.get("peak_extra_mem_bytes")]
            if times:
                mem = f", peak extra memory {_span(mems)}× (forward+backward)" if mems else ""
                parts.append(f"{prov} at " + ", ".join(times) + mem)
        if parts:
            n = len(dict.fromkeys(r["case"] for r in rs))
            lines.append(f"- **{suite}** on {_device(d['env'])}, {d['env']['date_utc'][:10]}, {n} case"
                         f"{'s' * (n > 1)} (`{_name(path)}`), time over torch's (below 1: faster): "
                         + "; ".join(parts) + ".")
    return lines


def summary(results_dir: Path = RESULTS) -> str:
    lines = []
    for path in sorted(results_dir.glob("*.json")):
        lines += _json_summary(path)
    for path in sorted(results_dir.glob("*.jsonl")):
        _, device, date, records = _read_jsonl(path)
        for family in dict.fromkeys(r["family"] for r in records):
            rs = [r for r in records if r["family"] == family]
            parts = _ratio_ranges(rs)
            if parts:
                lines.append(f"- **{family}** on {device}, {date}, {len(rs)} case{'s' * (len(rs) > 1)} "
                             f"(`{_name(path)}`): pykernels at " + "; ".join(parts) + ".")
    return "\n".join(lines) or "No side-by-side results have been measured yet."


# The README's one table: every measured comparison of ours with the suite's baseline, grouped.
SUITE_ORDER = ("cross_entropy", "linear_cross_entropy", "attention", "lstm", "lstm_cell", "e2e")
HEADLINE_MODES = {"fwd+bwd": "forward+backward", "train": "forward+backward", "fwd": "forward"}
JSONL_MODES = {"fwdbwd_ms": "forward+backward", "fwd_ms": "forward"}


def _short_device(name: str) -> str:
    """One name per machine across file formats (the JSONL files say "H100 80GB HBM3", the JSON ones "NVIDIA H100
    80GB HBM3"), without trademark marks."""
    return re.sub(r"\s+", " ", re.sub(r"\(R\)|\(TM\)|^NVIDIA ", "", name)).strip()


class _Group:
    def __init__(self):
        self.speed: Dict[str, List[float]] = {}
        self.cases, self.files, self.dates, self.ceiling = set(), set(), set(), []

    def add(self, mode: str, speed: float, case, path: Path, date: str, pct=None, kind=None):
        self.speed.setdefault(mode, []).append(speed)
        self.cases.add((path.name, case))
        self.files.add(path.name)
        self.dates.add(date)
        if pct is not None:
            self.ceiling.append((pct, kind))


def _headline_groups(results_dir: Path) -> Dict[tuple, _Group]:
    """(suite, device, dtype, ours, baseline) -> the speed-ups (baseline's time over ours) of every case."""
    groups: Dict[tuple, _Group] = {}
    for path in sorted(results_dir.glob("*.json")):
        d = json.loads(path.read_text())
        device, date = _short_device(_device(d["env"])), d["env"]["date_utc"][:10]
        for r, t in _torch_pairs(d["results"]):
            if r["mode"] not in HEADLINE_MODES or not (r.get("ms_p50") and t.get("ms_p50")):
                continue
            pct, kind = ((r["pct_of_copy_bw"], "copy BW") if r.get("pct_of_copy_bw") is not None else
                         (r["pct_of_matmul"], "matmul") if r.get("pct_of_matmul") is not None else (None, None))
            g = groups.setdefault((r["suite"], device, r["dtype"], r["provider"], "torch"), _Group())
            g.add(HEADLINE_MODES[r["mode"]], t["ms_p50"] / r["ms_p50"], r["case"], path, date, pct, kind)
    for path in sorted(results_dir.glob("*.jsonl")):
        _, device, date, records = _read_jsonl(path)
        device = _short_device(device)
        for i, r in enumerate(records):
            for metric, mode in JSONL_MODES.items():
                for other, ours, theirs in _against_others(r, metric):
                    if ours > 0:
                        key = (r["family"], device, str(r.get("dtype", DASH)).replace("torch.", ""), "pykernels",
                               other)
                        groups.setdefault(key, _Group()).add(mode, theirs / ours, i, path, date)
    return groups


def _speed_cell(speeds: List[float]) -> str:
    if not speeds:
        return DASH
    med = statistics.median(speeds)
    return f"{med:.2f}×" if len(speeds) == 1 else f"{med:.2f}× ({min(speeds):.2f}–{max(speeds):.2f})"


def headline(results_dir: Path = RESULTS) -> str:
    """One row per (op, device, dtype, our provider, baseline) over every committed file: the median and range of
    the speed-up (baseline's time over ours, above 1: ours faster) per mode, and ours' best % of the ceiling."""
    groups = _headline_groups(results_dir)
    if not groups:
        return "No side-by-side results have been measured yet."
    order = {s: i for i, s in enumerate(SUITE_ORDER)}
    rows = []
    for key in sorted(groups, key=lambda k: (order.get(k[0], len(order)), k[0], k[1], k[2], k[3], k[4])):
        suite, device, dtype, ours, other = key
        g = groups[key]
        best = max(g.ceiling, default=None)
        rows.append([suite, device, dtype, f"{ours} vs {other}",
                     _speed_cell(g.speed.get("forward+backward", [])), _speed_cell(g.speed.get("forward", [])),
                     DASH if best is None else f"{best[0]:.0f}% {best[1]}",
                     str(len(g.cases)), f"{max(g.dates)} ({len(g.files)} file{'s' * (len(g.files) > 1)})"])
    header = ["op", "device", "dtype", "provider", "speed-up forward+backward", "speed-up forward",
              "best % of ceiling", "cases", "latest (files)"]
    return "\n".join(_table(header, rows, always=len(header)))


# ---------------------------------------------------------------------------------------------------------

def render(results_dir: Path = RESULTS, base: Path = REPO) -> str:
    """Every table; plot links relative to ``base``, the folder of the file that will hold them."""
    files = sorted(list(results_dir.glob("*.json")) + list(results_dir.glob("*.jsonl")))
    if not files:
        return "No results have been measured yet."
    return "\n\n".join(render_jsonl(f.resolve()) if f.suffix == ".jsonl" else render_file(f.resolve(), base)
                       for f in files)


# section name -> its text from (results directory, folder of the file being written)
SECTIONS: Dict[str, Callable[[Path, Path], str]] = {"tables": render, "summary": lambda r, _: summary(r),
                                                    "headline": lambda r, _: headline(r)}
_SECTION = re.compile(r"(<!-- results:(\w+):begin -->).*?(<!-- results:\2:end -->)", re.S)


def update_readme(text: str, results_dir: Path = RESULTS, base: Path = REPO) -> str:
    """``text`` (a file in the folder ``base``) with every results section regenerated; at least one must exist, and
    only known names."""
    names = [m.group(2) for m in _SECTION.finditer(text)]
    if not names:
        raise ValueError("the README has no <!-- results:<name>:begin --> ... <!-- results:<name>:end --> section")
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown results section(s) {unknown}; known: {sorted(SECTIONS)}")
    return _SECTION.sub(lambda m: f"{m.group(1)}\n{SECTIONS[m.group(2)](results_dir, base)}\n{m.group(3)}", text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.render", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(RESULTS), help="directory of .json / .jsonl files")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--out", default=None, help="write the tables to this file")
    g.add_argument("--readme", default=None, const="", nargs="?", metavar="FILE",
                   help="rewrite this file's results sections (default: README.md and docs/results.md)")
    g.add_argument("--check", default=None, const="", nargs="?", metavar="FILE",
                   help="exit 1 if this file's results sections are stale (default: README.md and docs/results.md)")
    g.add_argument("--plots", action="store_true",
                   help="draw every JSON file's plots into <results>/plots/<file>/ (then --readme links them)")
    a = p.parse_args(argv)
    results = Path(a.results)
    if a.plots:
        for path in write_all_plots(results):
            print(path)
    elif a.out:
        Path(a.out).write_text(render(results, Path(a.out).resolve().parent) + "\n")
    elif a.readme is not None or a.check is not None:
        named = a.readme if a.readme is not None else a.check
        stale = 0
        for path in [Path(named)] if named else GENERATED:
            if not path.is_file():
                p.error(f"{'--check' if a.check is not None else '--readme'} {path}: no such file")
            old = path.read_text()
            new = update_readme(old, results, path.resolve().parent)
            if a.check is None:
                if new != old:
                    path.write_text(new)
            elif new != old:
                print(f"{path} is stale: run `python -m bench.render --readme` and commit it", file=sys.stderr)
                stale = 1
            else:
                print(f"{path}: results sections up to date")
        return stale
    else:
        print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
