"""`attnres-fx bench`: the compiler suite's CSV, accuracy check, summary and failure handling, on tiny models.

Each entry is a fresh worker process (a few seconds each for eager / aot_eager, ~30 s for Inductor on CPU).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import statistics

import pytest
import torch

from attnres_fx.bench import accuracy, report
from attnres_fx.cli import main

TESTS = os.path.dirname(__file__)


def bench(out, *argv: str) -> tuple[int, list[dict], dict]:
    """Run the suite; its exit status, CSV rows and JSON."""
    try:
        main(["bench", "--iterations", "2", "--out", str(out), *argv])
        status = 0
    except SystemExit as exit:
        status = exit.code
    (csv_path,) = out.glob("*.csv")
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    return status, rows, json.loads(csv_path.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def passing_run(tmp_path_factory):
    return bench(tmp_path_factory.mktemp("bench"), "--only", "handwritten,llama", "--backends", "eager,aot_eager")


def test_suite_writes_one_row_per_model_variant_and_backend_in_the_harness_columns(passing_run) -> None:
    status, rows, _ = passing_run
    assert status == 0
    assert list(rows[0]) == report.COLUMNS
    assert {(r["name"], r["variant"], r["backend"]) for r in rows} == {
        (m, v, b) for m in ("handwritten", "llama") for v in ("original", "attnres") for b in ("eager", "aot_eager")
    }
    for r in rows:
        assert r["accuracy"] == "pass" and r["error"] == ""
        assert float(r["mismatch"]) <= 1e-4
        assert float(r["speedup"]) == pytest.approx(float(r["eager_latency"]) / float(r["abs_latency"]))
        assert float(r["compilation_latency"]) > 0 and int(r["unique_graphs"]) >= 1 and int(r["graph_breaks"]) == 0


def test_overhead_and_summary_come_from_the_rows(passing_run) -> None:
    _, rows, data = passing_run
    latency = {(r["name"], r["variant"], r["backend"]): float(r["abs_latency"]) for r in rows}
    for r in rows:
        expected = latency[r["name"], "attnres", r["backend"]] / latency[r["name"], "original", r["backend"]]
        assert (r["attnres_overhead"] == "") == (r["variant"] == "original")
        if r["variant"] == "attnres":
            assert float(r["attnres_overhead"]) == pytest.approx(expected)
    aot = next(s for s in data["summary"] if s["backend"] == "aot_eager" and s["variant"] == "attnres")
    speedups = [float(r["speedup"]) for r in rows if r["backend"] == "aot_eager" and r["variant"] == "attnres"]
    assert aot["pass_rate"] == "2/2"
    assert aot["speedup_gmean"] == pytest.approx(statistics.geometric_mean(speedups))
    assert data["wall_seconds"] > 0 and data["mode"] == "training"


@pytest.mark.compile
def test_accuracy_check_fails_a_wrong_backend_and_passes_inductor(tmp_path, monkeypatch) -> None:
    """A backend that scales outputs by 1.01 fails the accuracy check (and the exit status); Inductor passes."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))
    status, rows, data = bench(tmp_path, "--only", "handwritten", "--backends", "inductor,perturbing_backend:perturbed")
    by_backend = {(r["backend"], r["variant"]): r for r in rows}
    for variant in ("original", "attnres"):
        assert by_backend["inductor", variant]["accuracy"] == "pass"
        wrong = by_backend["perturbing_backend:perturbed", variant]
        assert wrong["accuracy"] == "fail_accuracy" and float(wrong["mismatch"]) == pytest.approx(0.01, rel=0.01)
        assert wrong["speedup"] == ""  # failures stay out of the speed summaries
    assert status == 1
    summary = next(s for s in data["summary"] if s["backend"] == "perturbing_backend:perturbed")
    assert summary["pass_rate"] == "0/1" and summary["speedup_gmean"] is None


def test_an_entry_past_its_timeout_is_a_row_and_the_run_goes_on(tmp_path) -> None:
    status, rows, _ = bench(tmp_path, "--only", "handwritten", "--backends", "eager", "--timeout", "0.5")
    assert status == 1
    assert [r["accuracy"] for r in rows] == ["timeout", "timeout"]
    assert all(r["error"] == "no result within 0.5 s" for r in rows)


def test_accuracy_rule_is_the_harness_rule() -> None:
    """Within tolerance of eager: pass without an fp64 run. Beyond it: pass when no further from fp64 than twice
    eager's error (plus tol/10), fail otherwise, and fail on NaN."""
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(4000, generator=g, dtype=torch.float64)

    def near(scale: float) -> torch.Tensor:
        return (exact + scale * torch.randn(4000, generator=g, dtype=torch.float64)).float()

    def no_fp64() -> list[torch.Tensor]:
        raise AssertionError("the fp64 run was not needed")

    eager = near(1e-3)  # an ill-conditioned model: eager fp32 itself 1e-3 from fp64
    assert accuracy.accurate([eager + 1e-6], [eager], no_fp64, "float32")
    assert accuracy.relative_error(near(1e-3), eager) > accuracy.TOLERANCE["float32"]
    assert accuracy.accurate([near(1e-3)], [eager], lambda: [exact], "float32")
    assert not accuracy.accurate([near(3e-3)], [eager], lambda: [exact], "float32")
    assert not accuracy.accurate([torch.full_like(eager, float("nan"))], [eager], lambda: [exact], "float32")


def test_gpu_script_fits_its_budget_and_names_real_steps(tmp_path):
    from benchmarks import gpu

    planned = gpu.steps(tmp_path)
    assert sum(limit for _, _, limit in planned) <= gpu.BUDGET_S
    for _, cmd, _ in planned:
        module = cmd[cmd.index("-m") + 1]
        assert importlib.util.find_spec(module) is not None, module
