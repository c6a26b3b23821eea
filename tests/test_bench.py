"""The benchmark harness on CPU: byte formulas, a provider whose output is wrong is reported and not timed,
an end-to-end --quick run writes a well-formed JSON, the README tables render from committed results."""
from __future__ import annotations

import json

import torch

from bench import __main__ as bench_main
from bench import cross_entropy as ce_suite
from bench import harness, render


def test_byte_model():
    assert ce_suite.fwd_bwd_bytes(8192, 128256, 2) == 2.0 * 8192 * 128256 * 2 + 8 * 8192


def test_wrong_provider_is_reported_not_timed(monkeypatch):
    real = ce_suite.providers

    def with_broken(device):
        p = real(device)
        p["broken"] = (lambda x, t: torch.nn.functional.cross_entropy(x * 1.5, t), None)
        return p
    monkeypatch.setattr(ce_suite, "providers", with_broken)
    rs = ce_suite.run(torch.device("cpu"), torch.float32, quick=True,
                      select=lambda n: n in ("broken", "torch"), shapes=[(64, 300)])
    by = {r.provider: r for r in rs}
    assert by["broken"].status == "wrong" and by["broken"].ms_p50 is None
    assert by["torch"].status == "ok" and by["torch"].ms_p50 > 0


def test_quick_run_writes_json(tmp_path, monkeypatch):
    monkeypatch.setitem(ce_suite.PRESETS, ("cpu", True), [(32, 1000)])
    assert bench_main.main(["--quick", "--device", "cpu", "--providers", "pykernels-*,torch",
                            "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*.json")
    d = json.loads(path.read_text())
    assert {"env", "ceilings", "results"} <= set(d) and d["env"]["device"] == "cpu"
    ok = [r for r in d["results"] if r["status"] == "ok"]
    assert {r["provider"] for r in ok} >= {"torch"} and all(r["ms_p50"] > 0 and r["gbps"] > 0 for r in ok)
    res = [harness.Result(**r) for r in d["results"]]
    assert "cross_entropy" in harness.table(res)


def test_committed_results_render():
    text = render.render()
    for f in render.RESULTS.glob("*.json"):
        env = json.loads(f.read_text())["env"]
        assert env["date_utc"][:10] in text


def test_compare_flags_regressions():
    old = {"results": [{"suite": "cross_entropy", "case": "c", "provider": "p", "mode": "fwd+bwd", "ms_p50": 1.0}]}
    slower = harness.Result("cross_entropy", "c", "p", "fwd+bwd", "bf16", {"N": 1}, ms_p50=1.2)
    same = harness.Result("cross_entropy", "c", "p", "fwd+bwd", "bf16", {"N": 1}, ms_p50=1.01)
    assert len(bench_main.regressions(old, [slower])) == 1
    assert bench_main.regressions(old, [same]) == []


def test_csv_and_plots(tmp_path):
    rs = [harness.Result("cross_entropy", f"V={v}", p, "fwd+bwd", "float32", {"N": 8, "V": v}, ms_p50=1.0 + v / 1e4,
                         bytes=1e6) for v in (100, 200) for p in ("a", "b")]
    rs = [harness.finish(r, {"copy_gbps": 10.0}) for r in rs]
    harness.write_csv(tmp_path / "r.csv", rs)
    assert (tmp_path / "r.csv").read_text().count("\n") == 5
    plots = harness.write_plots(tmp_path, rs)
    assert all(p.exists() for p in plots)
