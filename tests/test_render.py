"""bench/render.py: the result sections of README.md and docs/results.md are exactly what the committed files in
bench/results/ give (this test is the CI check), every table names its device and date, JSONL tables, the ratio
summary and the README's headline table."""
from __future__ import annotations

import json
import re

import pytest

from bench import harness, render, report

DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")


def test_readme_is_generated_from_the_committed_results(capsys):
    assert render.main(["--check"]) == 0, "README.md or docs/results.md is stale: run `python -m bench.render --readme`"
    assert "README.md" in capsys.readouterr().out  # --check without a file checks both
    assert "<!-- results:headline:begin -->" in render.README.read_text()
    text = render.RESULTS_DOC.read_text()
    assert "<!-- results:tables:begin -->" in text and "<!-- results:summary:begin -->" in text


def test_links_resolve_from_the_file_that_holds_them():
    """Every relative link of README.md and docs/results.md names a file (the plots' links, written for the README
    at the top level, broke when the tables moved to docs/)."""
    for doc in render.GENERATED:
        links = re.findall(r"\]\(([^)#:]+)\)", doc.read_text())
        assert links, doc
        missing = [t for t in links if not (doc.parent / t).exists()]
        assert not missing, f"{doc.name}: {len(missing)} broken links, e.g. {missing[:3]}"


def test_every_table_names_device_and_date():
    tables = [t for t in render.render().split("\n\n**")]
    assert len(tables) >= len(list(render.RESULTS.glob("*.json*")))
    for t in tables:
        head = t.splitlines()[0]
        assert " on **" in head and DATE.search(head) and "(`bench/results/" in head, head
    for line in render.summary().splitlines():
        assert line.startswith("- **") and " on " in line and DATE.search(line), line


def _jsonl(tmp_path, name="gpu0-x-20260102.jsonl"):
    rows = [{"_about": "python -m bench.quick_gpu; Dev Z (driver 1.0), torch 9"},
            {"family": "attention", "L": 128, "dtype": "torch.bfloat16", "pykernels_fwd_ms": 2.0, "sdpa_fwd_ms": 1.0,
             "pykernels_peak_extra_mib": 10, "sdpa_peak_extra_mib": 40},
            {"family": "attention", "L": 256, "dtype": "torch.bfloat16", "pykernels_fwd_ms": 4.5, "sdpa_fwd_ms": 1.5},
            {"family": "lstm", "T": 8, "pykernels_fwdbwd_ms": 1.0, "cudnn_fwdbwd_ms": 4.0, "dispatch": "{...}"}]
    (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_jsonl_tables_and_summary(tmp_path):
    _jsonl(tmp_path)
    md = render.render(tmp_path)
    assert md.count("on **Dev Z**, 2026-01-02") == 2  # one table per family
    assert "| 256 | bfloat16 | 4.5 | 1.5 | – | – |" in md and "dispatch" not in md
    assert render.summary(tmp_path).splitlines() == [
        "- **attention** on Dev Z, 2026-01-02, 2 cases (`" + str(tmp_path / "gpu0-x-20260102.jsonl") +
        "`): pykernels at forward time 2.00–3.00× sdpa's; peak extra memory 0.25× sdpa's.",
        "- **lstm** on Dev Z, 2026-01-02, 1 case (`" + str(tmp_path / "gpu0-x-20260102.jsonl") +
        "`): pykernels at forward+backward time 0.25× cudnn's."]
    (tmp_path / "undated.jsonl").write_text('{"family": "lstm"}\n')
    with pytest.raises(ValueError, match="must carry its date"):
        render.render(tmp_path)


def test_json_tables_keep_only_measured_columns(tmp_path):
    rs = [harness.Result("e2e", "gpt B=2 T=8", p, "train", "float32", {"B": 2, "T": 8}, ms_p50=ms, ms_p20=ms,
                         ms_p80=ms, tokens=16.0) for p, ms in (("torch", 2.0), ("pykernels-auto", 1.0))]
    harness.derive(rs, {"copy_gbps": 1.0})
    harness.add_speedups(rs, ["torch"])
    report.write_json(tmp_path / "cpu-e2e-20260102.json", {"date_utc": "2026-01-02T00:00:00", "device_name": "Dev Y"},
                      {"copy_gbps": 1.0}, rs)
    md = render.render(tmp_path)
    header = next(line for line in md.splitlines() if line.startswith("| case"))
    assert header == "| case | dtype | mode | provider | ms (p50) | p20–p80 | tokens/s | speed-up |"
    assert "| pykernels-auto | 1.000 | 1.000–1.000 | 16000 | 2.00× torch |" in md


def test_check_and_rewrite(tmp_path, capsys):
    _jsonl(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:summary:begin -->\nold 9.99× typed by hand\n<!-- results:summary:end -->\n")
    args = ["--results", str(tmp_path)]
    assert render.main(args + ["--check", str(readme)]) == 1
    assert "stale" in capsys.readouterr().err
    assert render.main(args + ["--readme", str(readme)]) == 0
    assert "9.99" not in readme.read_text() and "2.00–3.00× sdpa's" in readme.read_text()
    assert render.main(args + ["--check", str(readme)]) == 0
    readme.write_text("<!-- results:nope:begin -->\n<!-- results:nope:end -->\n")
    with pytest.raises(ValueError, match="unknown results section"):
        render.main(args + ["--check", str(readme)])
    readme.write_text("no sections\n")
    with pytest.raises(ValueError, match="has no <!-- results"):
        render.main(args + ["--readme", str(readme)])


def test_plots_are_linked_when_drawn(tmp_path):
    """The tables section links exactly the plots present in <results>/plots/<file>/, named as report.write_plots
    names them (drawn here when matplotlib is installed, else stand-in files under those names)."""
    rs = [harness.Result("cross_entropy", f"N={n} V={v}", p, "fwd+bwd", "float32", {"N": n, "V": v}, ms_p50=1.0,
                         ms_p20=1.0, ms_p80=1.0, bytes=1e6) for n, v in ((8, 100), (16, 300)) for p in ("a", "b")]
    harness.derive(rs, {"copy_gbps": 10.0})
    path = tmp_path / "cpu-cross_entropy-20260102.json"
    report.write_json(path, {"date_utc": "2026-01-02T00:00:00", "device_name": "Dev Z"}, {}, rs)
    assert "Plots:" not in render.render(tmp_path)
    names = list(report.plot_groups(rs))
    assert names == ["cross_entropy-fwd_bwd-float32.png"]
    _, key, metric, _ = report.plot_groups(rs)[names[0]]
    assert key == ("N", "V") and metric == "gbps"  # both sizes vary: plotted against N·V
    folder = tmp_path / "plots" / path.stem
    try:
        import matplotlib  # noqa: F401
        assert [p.name for p in render.write_all_plots(tmp_path)] == names
    except ImportError:
        folder.mkdir(parents=True)
        (folder / names[0]).write_bytes(b"png")
    md = render.render(tmp_path)
    link = next(line for line in md.splitlines() if line.startswith("Plots:"))
    assert link.endswith(f"plots/{path.stem}/{names[0]})") and "[fwd+bwd float32]" in link


def test_json_summary_is_each_providers_time_over_torchs(tmp_path):
    rs = [harness.Result("lstm", f"T={t}", p, mode, "bfloat16", {"T": t}, ms_p50=ms, ms_p20=ms, ms_p80=ms,
                         peak_extra_mem_bytes=mem)
          for t, p, mode, ms, mem in ((1, "torch", "fwd+bwd", 4.0, 100), (1, "pykernels-cuda", "fwd+bwd", 2.0, 25),
                                      (2, "torch", "fwd+bwd", 3.0, 100), (2, "pykernels-cuda", "fwd+bwd", 6.0, 25),
                                      (1, "torch", "fwd", 1.0, None), (1, "pykernels-cuda", "fwd", 3.0, None),
                                      (2, "pykernels-triton", "fwd", 1.0, None))]
    report.write_json(tmp_path / "gpu-lstm-20260103.json", {"date_utc": "2026-01-03T00:00:00", "device_name": "Dev W"},
                      {"copy_gbps": 1.0}, rs)
    assert render.summary(tmp_path).splitlines() == [
        "- **lstm** on Dev W, 2026-01-03, 2 cases (`" + str(tmp_path / "gpu-lstm-20260103.json") + "`), time over "
        "torch's (below 1: faster): pykernels-cuda at forward+backward time 0.50–2.00×, forward time 3.00×, peak "
        "extra memory 0.25× (forward+backward)."]  # pykernels-triton: no torch time of its case to compare


def test_headline_groups_every_file_by_op_machine_dtype_and_provider(tmp_path):
    """One row per (op, machine, dtype, provider) over every file, JSON and JSONL alike: speed-up = the baseline's time
    over ours (the median, then the range), ours' best % of ceiling, cases and files; a JSONL file's device is named
    as a JSON file's (no "NVIDIA ")."""
    def run(name, date, cases, dtype="float32"):
        rs = [harness.Result("lstm", f"T={t}", p, mode, dtype, {"T": t}, ms_p50=ms, ms_p20=ms, ms_p80=ms)
              for t, p, mode, ms in cases]
        for r in rs:
            r.pct_of_matmul = 40.0 if r.provider != "torch" else 50.0
        report.write_json(tmp_path / name, {"date_utc": f"{date}T00:00:00", "device_name": "NVIDIA Dev H"},
                          {"copy_gbps": 1.0}, rs)
    run("gpu-lstm-20260103.json", "2026-01-03", [(1, "torch", "fwd+bwd", 4.0), (1, "pykernels-cuda", "fwd+bwd", 2.0),
                                                 (1, "torch", "fwd", 1.0), (1, "pykernels-cuda", "fwd", 2.0)])
    run("gpu-lstm-20260104.json", "2026-01-04", [(2, "torch", "fwd+bwd", 3.0), (2, "pykernels-cuda", "fwd+bwd", 1.0),
                                                 (3, "torch", "fwd+bwd", 1.0), (3, "pykernels-cuda", "fwd+bwd", 2.0),
                                                 (3, "pykernels-triton", "fwd", 1.0)])
    run("gpu-lstm-bf16-20260104.json", "2026-01-04",
        [(1, "torch", "fwd+bwd", 1.0), (1, "pykernels-cuda", "fwd+bwd", 1.0)], dtype="bfloat16")
    (tmp_path / "gpu0-x-20260105.jsonl").write_text("\n".join(json.dumps(r) for r in (
        {"_about": "python -m bench.quick_gpu; Dev H (driver 1.0)"},
        {"family": "lstm", "dtype": "torch.float32", "pykernels_fwdbwd_ms": 1.0, "cudnn_fwdbwd_ms": 4.0})) + "\n")
    lines = render.headline(tmp_path).splitlines()
    assert lines[0].startswith("| op | device | dtype | provider | speed-up forward+backward | speed-up forward |")
    assert lines[2:] == [
        "| lstm | Dev H | bfloat16 | pykernels-cuda vs torch | 1.00× | – | 40% matmul | 1 | 2026-01-04 (1 file) |",
        "| lstm | Dev H | float32 | pykernels vs cudnn | 4.00× | – | – | 1 | 2026-01-05 (1 file) |",
        "| lstm | Dev H | float32 | pykernels-cuda vs torch | 2.00× (0.50–3.00) | 0.50× | 40% matmul | 3 | "
        "2026-01-04 (2 files) |"]  # pykernels-triton: no torch time of its case to compare


def test_json_summary_memory_is_of_the_forward_backward_mode_only(tmp_path):
    """The summary's peak extra memory is labelled "(forward+backward)": a forward-only record's memory (another
    ratio) stays out of it."""
    rs = [harness.Result("lstm", "T=1", p, mode, "bfloat16", {"T": 1}, ms_p50=ms, ms_p20=ms, ms_p80=ms,
                         peak_extra_mem_bytes=mem)
          for p, mode, ms, mem in (("torch", "fwd+bwd", 4.0, 100), ("pykernels-cuda", "fwd+bwd", 2.0, 25),
                                   ("torch", "fwd", 1.0, 100), ("pykernels-cuda", "fwd", 1.0, 10))]
    report.write_json(tmp_path / "gpu-lstm-20260103.json", {"date_utc": "2026-01-03T00:00:00", "device_name": "Dev W"},
                      {"copy_gbps": 1.0}, rs)
    assert render.summary(tmp_path).endswith(
        "pykernels-cuda at forward+backward time 0.50×, forward time 1.00×, peak extra memory 0.25× "
        "(forward+backward).")


def test_json_tables_show_p20_before_p80_and_name_absent_providers(tmp_path):
    """Checked on a file of its own, not only through the README snapshot (a bug there becomes the new snapshot
    when the README is regenerated with it)."""
    rs = [harness.Result("lstm", "T=1", "torch", "fwd", "float32", {"T": 1}, ms_p50=2.0, ms_p20=1.5, ms_p80=3.0),
          harness.Result("lstm", "T=1", "liger", "fwd", "float32", {"T": 1}, status="absent",
                         error="liger runs on CUDA only")]
    report.write_json(tmp_path / "cpu-lstm-20260103.json", {"date_utc": "2026-01-03T00:00:00", "device_name": "Dev"},
                      {"copy_gbps": 1.0}, rs)
    md = render.render(tmp_path)
    assert "| T=1 | float32 | fwd | torch | 2.000 | 1.500–3.000 |" in md and "| liger" not in md
    assert "Not measured: liger: liger runs on CUDA only" in md


def test_headline_counts_a_training_step_as_forward_backward(tmp_path):
    """The e2e suite's mode "train" is a forward+backward comparison in the headline (checked outside the snapshot)."""
    rs = [harness.Result("e2e", "gpt B=2 T=8", p, "train", "float32", {"B": 2, "T": 8}, ms_p50=ms, ms_p20=ms,
                         ms_p80=ms, tokens=16.0) for p, ms in (("torch", 3.0), ("pykernels-auto", 2.0))]
    report.write_json(tmp_path / "cpu-e2e-20260103.json", {"date_utc": "2026-01-03T00:00:00", "device_name": "Dev"},
                      {"copy_gbps": 1.0}, rs)
    assert "| e2e | Dev | float32 | pykernels-auto vs torch | 1.50× | – | – | 1 | 2026-01-03 (1 file) |" in \
        render.headline(tmp_path)
