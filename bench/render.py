"""Render the measured JSON files of bench/results/ as markdown tables (device and date in every table).

`python -m bench.render` prints them; `python -m bench.render --readme README.md` rewrites the README's
section between <!-- results:begin --> and <!-- results:end -->. Nothing in that section is typed by hand.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _fmt(v, spec):
    return "–" if v is None else format(v, spec)


def render_file(path: Path) -> str:
    d = json.loads(path.read_text())
    env, ceil = d["env"], d.get("ceilings", {})
    head = (f"**{env.get('gpu', env.get('cpu', env['device']))}**, {env['date_utc'][:10]}, torch {env['torch']}, "
            f"triton {env.get('triton')}, CUDA {env.get('cuda')}, driver {env.get('driver', '–')}, commit "
            f"`{env.get('git_commit', 'unknown')[:10]}` — measured ceilings: copy "
            f"{_fmt(ceil.get('copy_gbps'), '.0f')} GB/s, bf16 matmul {_fmt(ceil.get('matmul_bf16_tflops'), '.0f')} "
            f"TFLOP/s (`{path.relative_to(RESULTS.parent.parent)}`)")
    lines = [head, "",
             "| suite | case | dtype | mode | provider | ms (p50) | GB/s | % copy BW | × torch | × torch.compile | extra memory MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        if r["status"] == "absent":
            continue
        extra = r.get("peak_extra_mem_bytes")
        status = "" if r["status"] == "ok" else f" ({r['status']})"
        lines.append(f"| {r['suite']} | {r['case']} | {r['dtype']} | {r['mode']} | {r['provider']}{status} | "
                     f"{_fmt(r.get('ms_p50'), '.3f')} | {_fmt(r.get('gbps'), '.0f')} | "
                     f"{_fmt(r.get('pct_of_copy_bw'), '.1f')} | {_fmt(r['speedup_vs'].get('torch'), '.2f')} | "
                     f"{_fmt(r['speedup_vs'].get('torch.compile'), '.2f')} | "
                     f"{_fmt(None if extra is None else extra / 2**20, '.0f')} |")
    absent = sorted({f"{r['provider']}: {r['error']}" for r in d["results"] if r["status"] == "absent"
                     and not r["provider"].startswith("pykernels-")})
    if absent:
        lines += ["", "Not measured: " + "; ".join(absent)]
    return "\n".join(lines)


def render(results_dir: Path = RESULTS) -> str:
    files = sorted(results_dir.glob("*.json"))
    if not files:
        return "No GPU results have been measured yet."
    return "\n\n".join(render_file(f) for f in files)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--readme", default=None)
    a = p.parse_args(argv)
    text = render()
    if not a.readme:
        print(text)
        return
    readme = Path(a.readme)
    s = readme.read_text()
    new = re.sub(r"<!-- results:begin -->.*<!-- results:end -->",
                 lambda m: f"<!-- results:begin -->\n{text}\n<!-- results:end -->", s, flags=re.S)
    readme.write_text(new)


if __name__ == "__main__":
    main()
