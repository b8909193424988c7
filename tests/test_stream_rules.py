"""Stream finding by structure: parallel residuals in any association order are one sublayer, and a stream
flattened inside a layer (a reshape that keeps the feature dim) is still the stream. Each rule on a hand-written
model against the independent reference, and the transformers models that needed it, at two shapes."""

from __future__ import annotations

import copy

import pytest
import reference
import torch
import zoo
from torch import nn

import attnres_fx

D = 32


class ParallelLayer(nn.Module):
    """`h + attn(n1(h)) + mlp(n2(h))`, written in the given association order."""

    def __init__(self, order: str):
        super().__init__()
        self.order = order
        self.n1, self.n2 = nn.RMSNorm(D), nn.RMSNorm(D)
        self.a, self.m = nn.Linear(D, D), nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def branch(self, h: torch.Tensor) -> torch.Tensor:
        return self.a(self.n1(h)) + self.m(self.n2(h))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a, m = self.a(self.n1(h)), self.m(self.n2(h))
        return {"(h+a)+m": lambda: (h + a) + m, "h+(a+m)": lambda: h + (a + m), "(a+h)+m": lambda: (a + h) + m,
                "m+(h+a)": lambda: m + (h + a)}[self.order]()  # fmt: skip


class FlattenedLayer(nn.Module):
    """Attention-like sublayer on [B, T, D], then the MLP sublayer on the stream flattened to [B*T, D] (as OPT)."""

    def __init__(self):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.a, self.m = nn.Linear(D, D), nn.Linear(D, D)

    def branches(self) -> list:
        return [lambda h: self.a(self.n1(h)), lambda h: self.m(self.n2(h.reshape(-1, D))).view_as(h)]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.a(self.n1(h))
        shape, flat = h.shape, h.reshape(-1, D)
        return (flat + self.m(self.n2(flat))).view(shape)


class Stack(nn.Module):
    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.embed = nn.Embedding(zoo.VOCAB, D)
        self.layers = nn.ModuleList(layers)
        self.norm = nn.RMSNorm(D)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)


def sublayers(model: Stack) -> list:
    found = []
    for layer in model.layers:
        found += [layer.branch] if isinstance(layer, ParallelLayer) else layer.branches()
    return found


def check_against_reference(model: Stack, block_size: int) -> None:
    torch.manual_seed(0)
    zoo.unit_scale_(model)
    original, ids = copy.deepcopy(model), zoo.token_ids()
    with torch.no_grad():
        expected_at_init = original(ids)
    tmodel = attnres_fx.transform(model, (ids,), block_size=block_size)
    tplan = attnres_fx.plan(tmodel)
    assert len(tplan.sites) == len(sublayers(original)) and tmodel is model
    with torch.no_grad():
        assert zoo.rel_err(tmodel(ids), expected_at_init) < 5e-4
        params = reference.random_site_parameters_(tmodel)
        start = original.embed(ids)
        expected = original.norm(reference.block_attnres(start, sublayers(original), params, block_size, 1e-6))
        out = tmodel(ids)
    assert zoo.rel_err(out, expected) < 1e-4
    assert zoo.rel_err(expected_at_init, expected) > 1e-2  # the check can fail: queries change the function


@pytest.mark.parametrize("order", ["(h+a)+m", "h+(a+m)", "(a+h)+m", "m+(h+a)"])
def test_parallel_residual_in_any_association_order_is_one_sublayer(order: str) -> None:
    check_against_reference(Stack([ParallelLayer(order) for _ in range(3)]), block_size=2)


@pytest.mark.parametrize("block_size", [1, 3])
def test_a_stream_flattened_inside_its_layer_is_still_the_stream(block_size: int) -> None:
    check_against_reference(Stack([FlattenedLayer() for _ in range(3)]), block_size=block_size)


NAMED = {  # transformers models that 0.1.0 refused or got wrong (issue 11), tiny configs
    "cohere": dict(),  # parallel block written `residual + attn + mlp`
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64, do_layer_norm_before=True),  # stream flattened in the layer
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),  # forward(**kwargs): use_cache default
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, head_dim=16),
    "mamba": dict(state_size=8, expand=2, conv_kernel=4, attn_implementation="eager"),  # export fixes the length
}


@pytest.mark.parametrize("model_type", list(NAMED))
def test_named_transformers_models_preserve_the_function_at_two_shapes(model_type: str) -> None:
    model = zoo.hf_causal_lm(model_type, num_hidden_layers=2, **NAMED[model_type])
    original = copy.deepcopy(model)
    tmodel = attnres_fx.transform(model)
    assert tmodel is model
    for batch, seq in [(2, 16), (3, 9)]:
        ids = zoo.token_ids(batch, seq, seed=batch)
        with torch.no_grad():
            assert zoo.rel_err(tmodel(input_ids=ids).logits, original(input_ids=ids).logits) < 1e-3


ENCODERS = {  # vision and speech encoders: example inputs built from their config
    "vit": dict(image_size=32, patch_size=8),
    "dinov2": dict(image_size=32, patch_size=8),  # LayerScale
    "siglip_vision_model": dict(image_size=32, patch_size=8),
    "whisper": dict(
        d_model=64,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        num_mel_bins=16,
        max_source_positions=16,
        vocab_size=zoo.VOCAB,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    ),
}


@pytest.mark.parametrize("model_type", list(ENCODERS))
def test_hf_encoders_get_example_inputs_from_their_config_and_preserve_the_function(model_type: str) -> None:
    model = zoo.hf_encoder(model_type, **ENCODERS[model_type])
    original = copy.deepcopy(model)
    tmodel = attnres_fx.transform(model)  # no example inputs given
    tplan = attnres_fx.plan(tmodel)
    assert len(tplan.sites) == 4 and tmodel is model
    name = original.main_input_name
    shape = {"pixel_values": (3, 3, 32, 32), "input_features": (3, 16, 32)}[name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, expected = tmodel(**{name: x}).last_hidden_state, original(**{name: x}).last_hidden_state
    assert zoo.rel_err(out, expected) < 1e-3


class TimeLoop(nn.Module):
    """A branch that loops over the sequence in Python: export fixes the length inside it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        steps, h = [], torch.zeros_like(x[:, 0])
        for t in range(x.shape[1]):
            h = 0.5 * h + x[:, t]
            steps.append(h)
        return self.lin(torch.stack(steps, 1))


class ByFour(nn.Module):
    """A branch that takes another path when the length is not a multiple of 4: export guards `seq % 4 == 0`."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] % 4 == 0:
            b, t, d = x.shape
            return self.lin(x.view(b, t // 4, 4, d).mean(2).repeat_interleave(4, dim=1))
        return 2 * self.lin(x)


class FlatResiduals(nn.Module):
    """Residual adds in the model's own forward, around branches that export specialises to the example's length."""

    def __init__(self, branch: type[nn.Module]):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(D) for _ in range(2))
        self.branches = nn.ModuleList(branch() for _ in range(2))
        self.final = nn.LayerNorm(D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, branch in zip(self.norms, self.branches):
            x = x + branch(norm(x))
        return self.final(x)


@pytest.mark.parametrize("branch", [TimeLoop, ByFour])
def test_the_models_own_forward_runs_at_lengths_export_specialised_away(branch: type[nn.Module]) -> None:
    """The captured graph is only read: at lengths where it would not hold (a Python loop over the sequence, a path
    taken only for multiples of 4), the model's own forward still computes the original function."""
    torch.manual_seed(0)
    model = zoo.unit_scale_(FlatResiduals(branch))
    original = copy.deepcopy(model)
    tmodel = attnres_fx.transform(model, (torch.randn(2, 16, D),))
    assert tmodel is model and len(attnres_fx.plan(tmodel).sites) == 2
    for length in (16, 9, 12):
        x = torch.randn(3, length, D)
        with torch.no_grad():
            assert zoo.rel_err(tmodel(x), original(x)) < 5e-4


TOKEN_OP_READERS = {  # timm models whose stream's end reaches its norm through token ops (tiny configs)
    "cait_xxs24_224": dict(depth=3, depth_token_only=1, init_values=0.5),  # norm1(cat(cls, x)), norm(cat(cls, x))
    "beit_base_patch16_224": dict(depth=3),  # fc_norm(x[:, 1:].mean(1))
}


@pytest.mark.parametrize("name", list(TOKEN_OP_READERS))
def test_a_stream_end_read_through_token_ops_then_a_norm_is_pre_norm(name: str) -> None:
    import timm

    torch.manual_seed(0)
    config = dict(img_size=32, patch_size=8, embed_dim=64, num_heads=4, num_classes=10, **TOKEN_OP_READERS[name])
    model = zoo.unit_scale_(timm.create_model(name, pretrained=False, **config)).eval()
    original = copy.deepcopy(model)
    tmodel = attnres_fx.transform(model)  # example images of the size it was built for (32), not its pretrained 224
    assert len(attnres_fx.plan(tmodel).streams[0].sites) == 6  # CaiT's class token is a second stream
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert zoo.rel_err(tmodel(x), original(x)) < 1e-4
        zoo.random_depth_(tmodel)
        assert zoo.rel_err(tmodel(x), original(x)) > 1e-2


class LayerNorm2d(nn.LayerNorm):
    """timm's channels-first LayerNorm: over C of N,C,H,W, by moving it last."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ChannelsFirst(nn.Module):
    """A MetaFormer-like stream in N,C,H,W: GroupNorm(1, C) and LayerNorm2d before convolutions."""

    def __init__(self, c: int = 8, layers: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        norm = lambda i: nn.GroupNorm(1, c, eps=1e-6) if i % 2 else LayerNorm2d(c, eps=1e-6)  # noqa: E731
        self.norms = nn.ModuleList(norm(i) for i in range(layers))
        self.branches = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(layers))
        self.final = nn.GroupNorm(1, c, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for norm, branch in zip(self.norms, self.branches):
            h = h + branch(norm(h))
        return self.final(h).mean((2, 3))


def test_a_channels_first_stream_attends_over_channels_at_any_image_size() -> None:
    """Keys are normalised and dotted over the channels (dim 1), not the width, so any image size works; equal to
    the reference run with the channels moved last."""
    torch.manual_seed(0)
    model = zoo.unit_scale_(ChannelsFirst())
    original = copy.deepcopy(model)
    tmodel = attnres_fx.transform(model, (torch.randn(2, 3, 16, 16),), block_size=2)
    assert tmodel.attnres.site_1.key_weight.shape == (8,)
    with torch.no_grad():
        x = torch.randn(2, 3, 24, 20)
        assert zoo.rel_err(tmodel(x), original(x)) < 1e-4
    params = reference.random_site_parameters_(tmodel)
    last, back = (lambda t: t.movedim(1, -1)), (lambda t: t.movedim(-1, 1))
    sublayers = [lambda h, n=n, b=b: last(b(n(back(h)))) for n, b in zip(original.norms, original.branches)]
    for size in [(16, 16), (24, 20)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            mixed = back(reference.block_attnres(last(original.stem(x)), sublayers, params, 2, 1e-6))
            assert zoo.rel_err(tmodel(x), original.final(mixed).mean((2, 3))) < 1e-4
            assert zoo.rel_err(tmodel(x), original(x)) > 1e-2


def test_poolformer_v2_channels_first_stream_preserves_the_function_at_two_image_sizes() -> None:
    import timm

    torch.manual_seed(0)
    model = zoo.unit_scale_(timm.create_model("poolformerv2_s12", pretrained=False, num_classes=10)).eval()
    original = copy.deepcopy(model)
    tmodel = attnres_fx.transform(model, (torch.randn(2, 3, 64, 64),))
    tplan = attnres_fx.plan(tmodel)
    widths = [tmodel.get_parameter(s.parametrised[0].key_weight).shape for s in tplan.streams]
    # one stream per stage, keys over its channels; stages 2 and 3 scale the stream before each add (`res_scale`):
    # `s * h + f(norm(h))` is no residual chain
    assert widths == [(64,), (128,)]
    for size in (64, 96):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert zoo.rel_err(tmodel(x), original(x)) < 1e-4
    zoo.random_depth_(tmodel)
    with torch.no_grad():
        assert zoo.rel_err(tmodel(x), original(x)) > 1e-2


def test_swin_gets_one_stream_per_stage_through_its_patch_merging() -> None:
    """Each stage's end is read by the next stage's patch merging (pad, view neighbours into the features, norm):
    a normalised read, so every stage is a stream of its own."""
    import timm

    torch.manual_seed(0)
    config = dict(img_size=64, window_size=4, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 2, 4, 4), num_classes=10)
    model = zoo.unit_scale_(timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **config)).eval()
    original = copy.deepcopy(model)
    tmodel = attnres_fx.transform(model)  # 64 px, as built
    tplan = attnres_fx.plan(tmodel)
    assert [(s.root, len(s.sites)) for s in tplan.streams] == [(f"layers.{i}.blocks", 4) for i in range(4)]
    assert not tplan.skipped
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert zoo.rel_err(tmodel(x), original(x)) < 1e-3
        zoo.random_depth_(tmodel)
        assert zoo.rel_err(tmodel(x), original(x)) > 1e-2
