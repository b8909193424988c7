"""The demo: it runs from the CLI at tiny sizes, writes valid plots with the expected content, and
its measurements are right (checked against the untransformed model at zero init)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import attnres_fx
from attnres_fx.cli import main
from attnres_fx.demo.measure import attnres_sublayer_rms, baseline_sublayer_rms, depth_weight_matrix
from attnres_fx.demo.model import Transformer

plt_image = pytest.importorskip("matplotlib.image")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TAB_BLUE, TAB_GRAY = (0x1F, 0x77, 0xB4), (0x7F, 0x7F, 0x7F)  # attnres, baseline curve colours


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    argv = ["demo", "--width", "32", "--layers", "2", "--heads", "2", "--num-blocks", "2", "--seq-len", "32"]
    main([*argv, "--batch-size", "4", "--steps", "12", "--eval-every", "6", "--out", str(out)])
    return out, json.loads((out / "results.json").read_text())


def _has_colour(image, rgb, tol: int = 8) -> bool:
    pixels = (image[..., :3] * 255).round()
    return bool((((pixels - torch.tensor(rgb).numpy()) ** 2).sum(-1) <= tol**2).any())


def test_demo_writes_three_valid_pngs(demo_run):
    out, _ = demo_run
    for name in ("loss.png", "sublayer_magnitude.png", "depth_weights.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        image = plt_image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name


def test_loss_and_magnitude_plots_draw_one_curve_per_model(demo_run):
    out, _ = demo_run
    for name in ("loss.png", "sublayer_magnitude.png"):
        image = plt_image.imread(out / name)
        assert _has_colour(image, TAB_BLUE) and _has_colour(image, TAB_GRAY), name


def test_results_report_both_models_with_the_same_budget(demo_run):
    _, results = demo_run
    base, attn = results["variants"]["baseline"], results["variants"]["attnres"]
    assert [s for s, _ in base["val_loss"]] == [s for s, _ in attn["val_loss"]] == [6, 12]
    assert attn["parameters"] > base["parameters"]
    assert all(math.isfinite(v["final_val_loss"]) and v["tokens_per_second"] > 0 for v in (base, attn))
    assert len(results["sublayer_rms"]["baseline"]) == len(results["sublayer_rms"]["attnres"]) == 4
    sites, matrix = results["depth_weights"]["sites"], results["depth_weights"]["matrix"]
    assert sites == ["site_1", "site_2", "site_3", "final"] and len(matrix) == 4


@pytest.fixture(scope="module")
def fresh_pair():
    torch.manual_seed(0)
    model = Transformer(32, 3, 2, 64)
    ids = torch.randint(0, 64, (2, 16))
    tmodel = attnres_fx.transform(model, (ids, ids), num_blocks=3)
    return model, tmodel, ids


def test_attnres_sublayer_rms_equals_original_at_zero_init(fresh_pair):
    # A fresh transform computes the original function, so every sublayer outputs what it did before:
    # the depth-attention sources must give back the original sublayer outputs.
    model, tmodel, ids = fresh_pair
    original = baseline_sublayer_rms(model, attnres_fx.plan(tmodel), ids, ids)
    derived = attnres_sublayer_rms(tmodel, ids, ids)
    assert len(original) == 6
    torch.testing.assert_close(torch.tensor(derived), torch.tensor(original), rtol=1e-4, atol=0)


def test_depth_weight_matrix_is_uniform_at_init_and_nan_where_no_source(fresh_pair):
    _, tmodel, ids = fresh_pair  # 6 sublayers, block size 2: sites 1..5 and final
    matrix = depth_weight_matrix(tmodel, ids, ids)
    assert matrix.shape == (6, 5)  # b0, b1, b2, b3, partial
    for row, site in zip(matrix, attnres_fx.plan(tmodel).parametrised):
        present = ~row.isnan()
        assert int(present.sum()) == site.num_sources
        torch.testing.assert_close(row[present], torch.full((site.num_sources,), 1 / site.num_sources))
    assert not matrix[0, -1].isnan() and matrix[1, -1].isnan()  # site 1 has a partial sum, site 2 not


def test_demo_over_seeds_reports_the_mean_and_spread_of_the_loss_gap(tmp_path):
    argv = ["demo", "--width", "16", "--layers", "2", "--heads", "2", "--num-blocks", "2", "--seq-len", "16"]
    main([*argv, "--batch-size", "2", "--steps", "4", "--eval-every", "4", "--seeds", "2", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "seeds.json").read_text())
    gaps = []
    for seed in (0, 1):  # each seed's own run, in its own folder
        final = json.loads((tmp_path / f"seed-{seed}" / "results.json").read_text())["variants"]
        gaps.append(final["attnres"]["final_val_loss"] - final["baseline"]["final_val_loss"])
    assert summary["seeds"] == [0, 1] and gaps[0] != gaps[1]
    assert summary["gap_mean"] == pytest.approx((gaps[0] + gaps[1]) / 2)
    assert summary["gap_std"] == pytest.approx(abs(gaps[0] - gaps[1]) / math.sqrt(2))
    assert summary["attnres_ahead"] == sum(g < 0 for g in gaps)
