"""README.md's facts that drift: the Layout section names paths that exist (it listed pykernels/functional.py after
functional became a package), the Environment variables table the variables read, typed numbers their files."""
from __future__ import annotations

import glob
import json
import os
import re

from conftest import ROOT


def test_layout_paths_exist():
    with open(os.path.join(ROOT, "README.md")) as f:
        block = re.search(r"## Layout\s*```(.*?)```", f.read(), re.S).group(1)
    paths = []
    for line in block.strip().splitlines():
        names = [p for p in re.split(r",\s*", line.split("  ")[0].strip()) if p]
        # "a/b/, c/": c/ is a sibling of b/, written short
        paths += [names[0]] + [os.path.join(os.path.dirname(names[0].rstrip("/")), n) for n in names[1:]]
    assert len(paths) > 10, paths
    missing = [p for p in paths if not glob.glob(os.path.join(ROOT, p.replace("<op>", "*")))]
    assert not missing, f"README's Layout names paths that do not exist: {missing}"


# How code reads a variable: os.environ[...] / .get(...), getenv(...) (Python and C++), the kernels' knob(...) helpers.
_ENV_READ = re.compile(r"""(?:environ(?:\.get)?\s*[\(\[]\s*|getenv\s*\(\s*|knob\(\s*|setdefault\(\s*)["']"""
                       r"""(PYKERNELS_[A-Z0-9_]+)["']""")
_ENV_READERS = ("pykernels/**/*.py", "csrc/**/*.cpp", "csrc/**/*.cu", "csrc/**/*.h", "csrc/**/*.cuh", "setup.py",
                "tests/**/*.py", "bench/**/*.py")


def test_environment_variables_table_lists_every_variable_read():
    """README's "Environment variables" table names exactly the PYKERNELS_* variables that the library, its build,
    the tests and the benchmarks read (16 of them, the CE tuning knobs among them, were documented nowhere)."""
    read = {}
    for pattern in _ENV_READERS:
        for path in glob.glob(os.path.join(ROOT, pattern), recursive=True):
            with open(path, errors="ignore") as f:
                for name in _ENV_READ.findall(f.read()):
                    read.setdefault(name, os.path.relpath(path, ROOT))
    with open(os.path.join(ROOT, "README.md")) as f:
        section = re.search(r"## Environment variables\n(.*?)\n## ", f.read(), re.S).group(1)
    listed = set(re.findall(r"^\| `(PYKERNELS_[A-Z0-9_]+)` \|", section, re.M))
    assert len(read) > 20, read
    missing = {n: p for n, p in read.items() if n not in listed}
    assert not missing, f"read but not in README's Environment variables table: {missing}"
    assert not listed - set(read), f"README's table lists variables nothing reads: {listed - set(read)}"


def test_avx2_lstm_range_in_words_matches_the_committed_measurement():
    """docs/results.md's "In words" AVX2 fp32 LSTM range (typed, not generated; the README's opening until the results
    moved there) is the one of the current measurement's files (it quoted 0.98–1.39×, the files before the K-blocked
    weight gradients)."""
    speed = []
    for path in glob.glob(os.path.join(ROOT, "bench/results/cpu-lstm-*avx2-k-blocked-*.json")):
        with open(path) as f:
            speed += [r["speedup_vs"]["torch"] for r in json.load(f)["results"]
                      if r["provider"] == "pykernels-cpu" and r["mode"] == "fwd+bwd" and r["dtype"] == "float32"
                      and r["status"] == "ok"]
    assert len(speed) > 10, speed
    with open(os.path.join(ROOT, "docs", "results.md")) as f:
        opening = " ".join(f.read().split("<!-- results:summary:begin -->")[0].split())
    claim = (f"{min(speed):.2f}–{max(speed):.2f}× forward+backward at B = 1–64, H = 128–1024 in fp32 (below 1× at "
             f"{sum(s < 1 for s in speed)} of the {len(speed)} shapes, by at most {round(100 * (1 - min(speed)))}%)")
    assert claim in opening, claim


def test_what_runs_where_thresholds_are_the_rules():
    """README's "What runs where" table types the automatic dispatch's thresholds (not generated): they must be the
    ones pykernels/backends.py's rule tables hold, so that a re-measured rule cannot leave the README behind."""
    import torch

    from pykernels import backends as b

    with open(os.path.join(ROOT, "README.md")) as f:
        section = " ".join(f.read().split("## What runs where")[1].split("## Results at a glance")[0].split())
    f32, bf16, f16 = (b.OURS_FASTER_DTYPE["lstm"]["cpu"][t][:2] for t in (torch.float32, torch.bfloat16, torch.float16))
    a32, abf16, af16 = (b.OURS_FASTER_DTYPE_OURS_AVX2["lstm"]["cpu"][t][:2]
                        for t in (torch.float32, torch.bfloat16, torch.float16))
    assert f32[0] == f32[1] and bf16[1] == 0 and a32[1] == 0 and abf16[1] == 0  # the shapes the sentences assume
    cell = b.NATIVE_FASTER_DTYPE["lstm_cell"]["cpu"][torch.bfloat16][:2]
    assert cell[0] == cell[1]
    ce, ce_ours_avx2, ce_avx2 = (t["cross_entropy"]["cpu"][:2] for t in (
        b.NATIVE_FASTER_BELOW, b.NATIVE_FASTER_BELOW_OURS_AVX2, b.NATIVE_FASTER_BELOW_AVX2))
    assert ce[0] == ce_ours_avx2[0] and ce_avx2[0] == ce_avx2[1]
    log2 = lambda n: n.bit_length() - 1  # noqa: E731
    claims = [
        f"fp32 ours up to batch {f32[0]} (with or without a gradient), bf16 up to {bf16[0]} with a gradient, "
        f"fp16 up to {f16[0]} with one and {f16[1]} without",
        f"(ours held at AVX2: fp32 {a32[0]} and bf16 {abf16[0]} with a gradient, fp16 {af16[0]} / {af16[1]})",
        f"bf16 from batch {cell[0]} torch's",
        f"from 2^{log2(ce[0])} logits with a gradient and 2^{log2(ce[1])} without (2^{log2(ce_ours_avx2[1])} with "
        f"ours held at AVX2 under torch's AVX512, 2^{log2(ce_avx2[0])} on AVX2-only CPUs)",
    ]
    missing = [c for c in claims if c not in section]
    assert not missing, f"README's What runs where differs from backends.py: {missing}"
