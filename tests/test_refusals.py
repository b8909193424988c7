"""Models that cannot be transformed are refused with one error family and a useful message."""

import copy

import pytest
import reference
import torch
import zoo

import attnres_fx
from attnres_fx import AttnResError
from attnres_fx.errors import AlreadyTransformedError, CaptureError, NoResidualStreamError, UnnormalizedReadError


def test_post_norm_bert_is_refused() -> None:
    with pytest.raises(NoResidualStreamError) as info:
        attnres_fx.transform(zoo.bert(), {"input_ids": zoo.token_ids()})
    message = str(info.value)
    assert "post-norm" in message and "encoder.layer.0" in message and "pre-norm" in message


def test_norm_after_the_branch_is_refused() -> None:
    with pytest.raises(NoResidualStreamError, match=r"found 2 residual adds .* branch output is normalised before"):
        attnres_fx.transform(zoo.NormAfterBranch(), (zoo.token_ids(),))


def test_model_without_residual_stream_is_refused() -> None:
    with pytest.raises(NoResidualStreamError, match="found no residual add"):
        attnres_fx.transform(zoo.NoResidual(), (torch.randn(2, 32),))


def test_raw_stream_read_is_refused_unless_allowed() -> None:
    model, x = zoo.RawHiddenOutput(), torch.randn(2, 5, 32)
    with pytest.raises(UnnormalizedReadError, match="returns stream values without a norm .* allow_unnormalized_reads"):
        attnres_fx.transform(model, (x,))
    original = copy.deepcopy(model)
    tmodel = attnres_fx.transform(model, (x,), allow_unnormalized_reads=True)
    assert [s.branch for s in attnres_fx.plan(tmodel).sites] == [("layers.0",), ("layers.1",)]
    with torch.no_grad():
        normed, raw = tmodel(x)
        ref_normed, ref_raw = original(x)
        reference.random_site_parameters_(tmodel)
        moved, moved_raw = tmodel(x)
    assert torch.allclose(normed, ref_normed, atol=1e-4)  # still read through the final norm
    # the adds sit in the model's own forward, which is handed the partial sum (zeros: a block starts there) and
    # adds the branch outputs to it: the raw read sees that sum, while the final norm reads the final aggregation
    assert torch.allclose(raw + x, ref_raw, atol=1e-4)
    assert zoo.rel_err(moved, ref_normed) > 1e-2 and zoo.rel_err(moved_raw, ref_raw) > 1e-2


def test_already_transformed_model_is_refused() -> None:
    tmodel = attnres_fx.transform(zoo.nanogpt(), (zoo.token_ids(),))
    with pytest.raises(AlreadyTransformedError, match="already transformed"):
        attnres_fx.transform(tmodel, (zoo.token_ids(),))
    wrapper = torch.nn.Sequential(tmodel)
    with pytest.raises(AlreadyTransformedError, match="submodule `0`"):
        attnres_fx.transform(wrapper, (zoo.token_ids(),))


def test_example_inputs_the_model_cannot_run_are_refused() -> None:
    with pytest.raises(CaptureError, match="cannot run the example inputs"):
        attnres_fx.transform(zoo.nanogpt(), (torch.randn(2, 16),))
    with pytest.raises(CaptureError, match="cannot run the example inputs"):
        attnres_fx.transform(zoo.llama(), {"input_ids": torch.randn(2, 16)})


def test_model_of_unknown_kind_without_inputs_asks_for_them() -> None:
    with pytest.raises(AttnResError, match="Pass `example_inputs="):
        attnres_fx.transform(zoo.nanogpt())


def test_bad_options_are_refused() -> None:
    with pytest.raises(AttnResError, match="unknown pass"):
        attnres_fx.transform(zoo.nanogpt(), (zoo.token_ids(),), passes=("fuse_everything",))
    with pytest.raises(AttnResError, match=">= 1"):
        attnres_fx.transform(zoo.nanogpt(), (zoo.token_ids(),), block_size=0)
    with pytest.raises(AttnResError, match="takes a model returned by attnres_fx.transform"):
        attnres_fx.plan(zoo.nanogpt())


def test_a_conv_before_the_norm_is_refused_saying_what_reads_the_stream() -> None:
    import timm

    convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=10).eval()
    with pytest.raises(NoResidualStreamError) as info:
        attnres_fx.transform(convnext, (torch.randn(2, 3, 32, 32),))
    message = str(info.value)
    assert "reads h first through `conv2d` in `stages.0.blocks.0.conv_dw`" in message
    assert "post-norm" not in message and "OLMo2" not in message


class ReadsStreamRaw(torch.nn.Module):
    """Pre-norm, except that the second sublayer also scales by a statistic of the raw stream."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.n1, self.n2, self.a, self.m = (
            torch.nn.LayerNorm(d),
            torch.nn.LayerNorm(d),
            torch.nn.Linear(d, d),
            torch.nn.Linear(d, d),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.a(self.n1(x))
        return x + self.m(self.n2(x)) * x.abs().mean()


def test_a_raw_read_inside_the_model_is_refused_without_offering_the_override() -> None:
    model = torch.nn.Sequential(ReadsStreamRaw(), ReadsStreamRaw(), torch.nn.LayerNorm(32))
    with pytest.raises(UnnormalizedReadError) as info:
        attnres_fx.transform(model, (torch.randn(2, 5, 32),))
    message = str(info.value)
    assert "inside the model the stream after sublayer 0 is also read without a norm, by `aten.abs" in message
    assert "allow_unnormalized_reads" not in message


def test_returned_hidden_states_read_through_a_norms_cast_are_found() -> None:
    """HF Llama's RMSNorm starts with `x.to(float32)`, in fp32 an alias of the stream that the returned hidden
    states then read: a read outside the norm, so raw."""
    with pytest.raises(UnnormalizedReadError, match="this call returns stream values without a norm"):
        attnres_fx.transform(zoo.llama(layers=2), {"input_ids": zoo.token_ids(), "output_hidden_states": True})


class MaskedBlock(torch.nn.Module):
    """A norm computed in the layer's own forward, and an optional argument torch.fx cannot follow."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.nn.functional.rms_norm(x, (x.shape[-1],))
        return x + self.lin(h if mask is None else h * mask)


def test_an_unrewritable_forward_is_refused_and_leaves_the_model_as_it_was() -> None:
    model = torch.nn.Sequential(MaskedBlock(), MaskedBlock(), torch.nn.LayerNorm(32))
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        before = model(x)
    refusal = r"`0` \(MaskedBlock\) computes a norm .* optional or variadic arguments \(mask\)"
    with pytest.raises(AttnResError, match=refusal):
        attnres_fx.transform(model, (x,))
    assert not hasattr(model, "attnres") and "forward" not in model[0].__dict__
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), before)
