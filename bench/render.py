"""Render the measured JSON files of bench/results/ as markdown tables, one per (file, suite), each headed by
its device, date, versions, commit and measured ceilings.

`python -m bench.render` prints them; `--out FILE` writes them to a file; `--readme README.md` rewrites the
README section between <!-- results:begin --> and <!-- results:end -->. Nothing in that section is typed.
"""
from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
HEADER = ["case", "dtype", "mode", "provider", "ms (p50)", "p20–p80", "GB/s", "% copy BW", "TFLOP/s",
          "% matmul", "speed-up", "extra memory MiB"]


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _rate(v) -> str:
    """Three significant digits without an exponent: 2094, 62.7, 1.31."""
    if v is None:
        return "–"
    return format(v, f".{max(0, 2 - int(math.floor(math.log10(abs(v))))) if v else 0}f")


def _device(env: dict) -> str:
    return env.get("device_name") or env.get("gpu") or env.get("cpu") or env.get("device", "?")


def _row(r: dict) -> str:
    extra = r.get("peak_extra_mem_bytes")
    status = "" if r["status"] == "ok" else f" ({r['status']})"
    spread = "–" if r.get("ms_p20") is None else f"{r['ms_p20']:.3f}–{r['ms_p80']:.3f}"
    speedup = ", ".join(f"{v:.2f}× {k}" for k, v in r.get("speedup_vs", {}).items()) or "–"
    cells = [r["case"], r["dtype"], r["mode"], r["provider"] + status, _fmt(r.get("ms_p50"), ".3f"), spread,
             _rate(r.get("gbps")), _fmt(r.get("pct_of_copy_bw"), ".1f"), _rate(r.get("tflops")),
             _fmt(r.get("pct_of_matmul"), ".1f"), speedup, _fmt(None if extra is None else extra / 2**20, ".0f")]
    return "| " + " | ".join(cells) + " |"


def render_file(path: Path) -> str:
    d = json.loads(path.read_text())
    env, ceil = d["env"], d.get("ceilings", {})
    name = path.relative_to(REPO) if path.resolve().is_relative_to(REPO) else path
    tables = []
    for suite in dict.fromkeys(r["suite"] for r in d["results"]):  # first-seen order
        rs = [r for r in d["results"] if r["suite"] == suite]
        head = (f"**{suite}** on **{_device(env)}**, {env['date_utc'][:10]} — torch {env.get('torch')}, "
                f"triton {env.get('triton')}, CUDA {env.get('cuda')}, driver {env.get('driver', '–')}, commit "
                f"`{env.get('git_commit', 'unknown')[:10]}`{' + uncommitted changes' if env.get('git_dirty') else ''}; "
                f"measured ceilings: copy {_rate(ceil.get('copy_gbps'))} GB/s"
                + (f", bf16 matmul {_rate(ceil['matmul_bf16_tflops'])} TFLOP/s" if "matmul_bf16_tflops" in ceil else "")
                + f" (`{name}`)")
        lines = [head, "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += [_row(r) for r in rs if r["status"] != "absent"]
        absent = sorted({f"{r['provider']}: {r['error']}" for r in rs if r["status"] == "absent"})
        if absent:
            lines += ["", "Not measured: " + "; ".join(absent)]
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def render(results_dir: Path = RESULTS) -> str:
    files: List[Path] = sorted(results_dir.glob("*.json"))
    if not files:
        return "No results have been measured yet."
    return "\n\n".join(render_file(f.resolve()) for f in files)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.render", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(RESULTS), help="directory of JSON files")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--out", default=None, help="write the markdown to this file")
    g.add_argument("--readme", default=None, help="rewrite this file's results:begin/end section")
    a = p.parse_args(argv)
    text = render(Path(a.results))
    if a.out:
        Path(a.out).write_text(text + "\n")
    elif a.readme:
        readme = Path(a.readme)
        s = readme.read_text()
        if "<!-- results:begin -->" not in s:
            raise SystemExit(f"{readme} has no <!-- results:begin --> ... <!-- results:end --> section")
        readme.write_text(re.sub(r"<!-- results:begin -->.*<!-- results:end -->",
                                 lambda m: f"<!-- results:begin -->\n{text}\n<!-- results:end -->", s, flags=re.S))
    else:
        print(text)


if __name__ == "__main__":
    main()
