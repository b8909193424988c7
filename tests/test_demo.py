"""The demo: it runs from the CLI at tiny sizes, writes valid plots with the expected content, and
its measurements are right (checked against the untransformed model at zero init)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import attnres_fx
from attnres_fx.cli import main
from attnres_fx.demo import gap_summary, verdict
from attnres_fx.demo.measure import depth_weight_matrix, stream_read_rms, sublayer_grad_norms, sublayer_output_rms
from attnres_fx.demo.model import Transformer

plt_image = pytest.importorskip("matplotlib.image")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TAB_BLUE, TAB_GRAY = (0x1F, 0x77, 0xB4), (0x7F, 0x7F, 0x7F)  # attnres, baseline curve colours


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    main(["demo", "--quick", "--steps", "12", "--eval-every", "6", "--out", str(out)])  # explicit flags win
    return out, json.loads((out / "results.json").read_text())


def _has_colour(image, rgb, tol: int = 8) -> bool:
    pixels = (image[..., :3] * 255).round()
    return bool((((pixels - torch.tensor(rgb).numpy()) ** 2).sum(-1) <= tol**2).any())


def test_demo_writes_three_valid_pngs(demo_run):
    out, _ = demo_run
    for name in ("loss.png", "depth_profile.png", "depth_weights.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        image = plt_image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name


def test_loss_and_magnitude_plots_draw_one_curve_per_model(demo_run):
    out, _ = demo_run
    for name in ("loss.png", "depth_profile.png"):
        image = plt_image.imread(out / name)
        assert _has_colour(image, TAB_BLUE) and _has_colour(image, TAB_GRAY), name


def test_results_report_both_models_at_every_seed_with_the_same_budget(demo_run):
    _, results = demo_run
    assert list(results["seeds"]) == ["0", "1"]  # --quick: two seeds, 4 layers
    for run in results["seeds"].values():
        base, attn = run["baseline"], run["attnres"]
        assert [s for s, _ in base["val_loss"]] == [s for s, _ in attn["val_loss"]] == [6, 12]
        assert attn["parameters"] > base["parameters"]
        assert all(math.isfinite(v["final_val_loss"]) and v["tokens_per_second"] > 0 for v in (base, attn))
    gaps = [r["attnres"]["final_val_loss"] - r["baseline"]["final_val_loss"] for r in results["seeds"].values()]
    assert results["gap"]["per_seed"] == pytest.approx(gaps)
    assert results["verdict"] == verdict(results["gap"])
    for name in ("baseline", "attnres"):
        profile = results["depth_profile"][name]
        assert len(profile["stream_read_rms"]) == 9 and len(profile["output_rms"]) == len(profile["grad_norm"]) == 8
    sites, matrix = results["depth_weights"]["sites"], results["depth_weights"]["matrix"]
    assert sites == [*(f"site_{j}" for j in range(1, 8)), "final"] and len(matrix) == 8


def test_gap_summary_and_verdict():
    ahead = gap_summary([-0.05, -0.04, -0.06])
    assert ahead["mean"] == pytest.approx(-0.05) and ahead["standard_error"] == pytest.approx(0.01 / math.sqrt(3))
    assert ahead["attnres_ahead"] == 3
    assert verdict(ahead).startswith("AttnRes ended 0.0500 nats/byte below the baseline")
    assert "3 seed(s)" in verdict(ahead) and "standard error 0.0058" in verdict(ahead)
    behind = verdict(gap_summary([0.05, 0.04, 0.06]))
    assert "above the baseline" in behind and "seed noise" not in behind
    for noise in ([0.01, -0.02, 0.015], [-0.05]):  # within two standard errors; one seed has none
        assert verdict(gap_summary(noise)).endswith("not distinguishable from seed noise.")


@pytest.fixture(scope="module")
def fresh_pair():
    torch.manual_seed(0)
    model = Transformer(32, 3, 2, 64)
    ids = torch.randint(0, 64, (2, 16))
    tmodel = attnres_fx.transform(copy.deepcopy(model), (ids, ids), num_blocks=3)  # in place: the original kept
    return model, tmodel, ids


def test_sublayer_outputs_are_the_originals_at_zero_init(fresh_pair):
    # A fresh transform computes the original function, so every sublayer outputs what it did before, and the
    # transformed model's hooks fire on its own modules.
    model, tmodel, ids = fresh_pair
    original = sublayer_output_rms(model, attnres_fx.plan(tmodel), ids, ids)
    derived = sublayer_output_rms(tmodel, attnres_fx.plan(tmodel), ids, ids)
    assert len(original) == 6
    torch.testing.assert_close(torch.tensor(derived), torch.tensor(original), rtol=1e-4, atol=0)


def _norm_inputs_rms(model, ids):
    """RMS of what each stream-reading norm of the demo model gets, in call order (an independent route)."""
    seen = []
    norms = [m for layer in model.layers for m in (layer.attn_norm, layer.mlp_norm)] + [model.norm]
    handles = [
        m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].pow(2).mean().sqrt().item())) for m in norms
    ]
    try:
        with torch.no_grad():
            model(ids, ids)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_stream_read_rms_is_what_the_norms_read(fresh_pair):
    # the original: the running residual sum; the transformed: each site's depth mix (the norms' pre-hooks
    # registered after the transform see the mix)
    model, tmodel, ids = fresh_pair
    for m in (model, tmodel):
        torch.testing.assert_close(
            torch.tensor(stream_read_rms(m, ids, ids)), torch.tensor(_norm_inputs_rms(m, ids)), rtol=1e-4, atol=0
        )
    assert stream_read_rms(model, ids, ids) != pytest.approx(stream_read_rms(tmodel, ids, ids))


def test_sublayer_grad_norms_are_the_branch_parameters_gradients(fresh_pair):
    model, tmodel, ids = fresh_pair
    norms = sublayer_grad_norms(model, attnres_fx.plan(tmodel), ids, ids)
    model(ids, ids).backward()
    branches = [m for layer in model.layers for m in (layer.attn, layer.mlp)]
    expected = [torch.cat([p.grad.flatten() for p in b.parameters()]).norm().item() for b in branches]
    model.zero_grad(set_to_none=True)
    assert norms == pytest.approx(expected, rel=1e-5)


def test_depth_weight_matrix_is_uniform_at_init_and_nan_where_no_source(fresh_pair):
    _, tmodel, ids = fresh_pair  # 6 sublayers, block size 2: sites 1..5 and final
    matrix = depth_weight_matrix(tmodel, ids, ids)
    assert matrix.shape == (6, 5)  # b0, b1, b2, b3, partial
    for row, site in zip(matrix, attnres_fx.plan(tmodel).parametrised):
        present = ~row.isnan()
        assert int(present.sum()) == site.num_sources
        torch.testing.assert_close(row[present], torch.full((site.num_sources,), 1 / site.num_sources))
    assert not matrix[0, -1].isnan() and matrix[1, -1].isnan()  # site 1 has a partial sum, site 2 not
