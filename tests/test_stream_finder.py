"""The stream finder's rules, one test each, on the FX graph of a one- or two-sublayer module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnres_fx.capture import capture, split_inputs
from attnres_fx.stream import RawResidual, Stream, find_streams

D = 8


def streams_of(forward, *modules: nn.Module, seq: int = 6) -> tuple[list[Stream], list[RawResidual]]:
    """Capture `forward(self, x)` on a module holding `modules` (as m0, m1, ...) and find its streams."""

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            for i, m in enumerate(modules):
                self.add_module(f"m{i}", m)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return forward(self, x)

    key, tensors = split_inputs((torch.randn(2, seq, D),), {}, False)
    return find_streams(capture(Probe(), key, tensors).gm.graph)


def stream_of(forward, *modules: nn.Module) -> Stream:
    """The one stream found."""
    (stream,) = streams_of(forward, *modules)[0]
    return stream


def test_an_add_whose_branch_reads_the_stream_through_a_norm_is_a_site() -> None:
    stream = stream_of(lambda s, x: s.m2(x + s.m1(s.m0(x))), nn.LayerNorm(D), nn.Linear(D, D), nn.LayerNorm(D))
    (site,) = stream.sites
    assert site.branch_modules == ("m1",) and site.reader_paths == ("m0",) and not stream.unnormalized_reads


def test_post_norm_and_normalised_branches_are_no_sites_and_say_so() -> None:
    post, post_raw = streams_of(lambda s, x: s.m0(x + s.m1(x)), nn.LayerNorm(D), nn.Linear(D, D))
    branch_normed, branch_raw = streams_of(lambda s, x: x + s.m0(s.m1(x)), nn.LayerNorm(D), nn.Linear(D, D))
    assert post == [] and branch_normed == []
    (p,), (b,) = post_raw, branch_raw
    assert (p.post_norm, p.branch_normed, p.first_read, p.first_read_module) == (True, False, "linear", "m1")
    assert (b.post_norm, b.branch_normed) == (False, True)


def test_parallel_branches_in_either_association_are_one_site() -> None:
    norms = (nn.LayerNorm(D), nn.Linear(D, D), nn.Linear(D, D), nn.LayerNorm(D))
    left = stream_of(lambda s, x: s.m3((x + s.m1(s.m0(x))) + s.m2(s.m0(x))), *norms)
    right = stream_of(lambda s, x: s.m3(x + (s.m1(s.m0(x)) + s.m2(s.m0(x)))), *norms)
    for stream in (left, right):
        (site,) = stream.sites
        assert set(site.branch_modules) == {"m1", "m2"} and not stream.unnormalized_reads
    assert len(left.sites[0].inner_adds) == 1 and len(left.sites[0].branches) == 2


def test_a_reshape_of_the_stream_that_keeps_the_feature_dim_is_looked_through() -> None:
    def forward(s, x):
        x = x + s.m1(s.m0(x))
        flat = x.reshape(-1, D)
        return s.m4((flat + s.m3(s.m2(flat))).view(x.shape))

    stream = stream_of(forward, nn.LayerNorm(D), nn.Linear(D, D), nn.LayerNorm(D), nn.Linear(D, D), nn.LayerNorm(D))
    assert [s.reader_paths for s in stream.sites] == [("m0",), ("m2",)] and not stream.unnormalized_reads


def test_a_cast_inside_a_norm_read_from_outside_it_is_a_raw_read() -> None:
    class CastNorm(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            xf = x.to(torch.float32)  # an alias of x in fp32
            self.cast = xf
            return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)

    def forward(s, x):
        y = x + s.m1(s.m0(x))
        return s.m2(y), s.m2.cast  # the second output reads the stream raw, through the norm's cast

    stream = stream_of(forward, CastNorm(), nn.Linear(D, D), CastNorm())
    assert len(stream.sites) == 1
    assert [(r.reader.op, r.stream_index) for r in stream.unnormalized_reads] == [("output", 1)]


def test_sizes_are_compared_by_value_not_by_how_they_print() -> None:
    """A branch that views the sequence in groups of 4 returns length `4*(s//4)` against the stream's `s`: equal
    under export's guard `s % 4 == 0`, though they print differently."""
    from test_stream_rules import ByFour, FlatResiduals

    key, tensors = split_inputs((torch.randn(2, 16, 32),), {}, False)
    (stream,), _ = find_streams(capture(FlatResiduals(ByFour), key, tensors).gm.graph)
    assert [s.reader_paths for s in stream.sites] == [("norms.0",), ("norms.1",)]


def test_a_functional_norm_is_recognised_by_what_it_computes() -> None:
    stream = stream_of(lambda s, x: F.layer_norm(x + s.m0(F.rms_norm(x, (D,), eps=1e-5)), (D,)), nn.Linear(D, D))
    (site,) = stream.sites
    assert site.eps == 1e-5 and site.reader_paths == ("",)  # computed in the model's own forward, not by a module


def test_a_module_holding_residual_adds_is_no_norm_even_if_it_computes_one() -> None:
    """A layer that normalises inline by hand and also reads the stream raw: the raw read is a raw read."""

    class InlineNormLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(D, D)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            return x + self.a(normed) * x.abs().mean()  # the scale reads the stream raw

    streams, _ = streams_of(lambda s, x: s.m1(s.m0(s.m0(x))), InlineNormLayer(), nn.LayerNorm(D))
    assert streams == []


class L2RMSNorm(nn.Module):
    """x-transformers' RMSNorm: `F.normalize(x, dim=-1) * sqrt(d) * (gamma + 1)`."""

    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * D**0.5 * (self.gamma + 1)


class ScaleNorm(nn.Module):
    """ScaleNorm with `torch.linalg.vector_norm`: one learned scalar over the L2-normalised input."""

    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-5) * self.g


def test_an_l2_normalise_and_scale_norm_written_with_f_normalize_is_a_norm() -> None:
    (site,) = stream_of(lambda s, x: s.m2(x + s.m1(s.m0(x))), L2RMSNorm(), nn.Linear(D, D), nn.LayerNorm(D)).sites
    assert site.reader_paths == ("m0",)


def test_a_scale_norm_written_with_linalg_vector_norm_is_a_norm() -> None:
    (site,) = stream_of(lambda s, x: s.m2(x + s.m1(s.m0(x))), ScaleNorm(), nn.Linear(D, D), nn.LayerNorm(D)).sites
    assert site.reader_paths == ("m0",)


def test_an_l2_norm_over_another_dim_than_the_features_is_no_norm() -> None:
    """Normalising over tokens mixes positions: not a per-token norm, so the branch reads the stream raw."""

    class TokenNormalize(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.normalize(x, dim=1)

    streams, _ = streams_of(lambda s, x: s.m2(x + s.m1(s.m0(x))), TokenNormalize(), nn.Linear(D, D), nn.LayerNorm(D))
    assert streams == []


def final_read(read) -> Stream:
    """Two pre-norm sublayers, then `read(stream)` as the final read."""
    return stream_of(lambda s, x: read(s, x + s.m1(s.m0(x))), nn.LayerNorm(D), nn.Linear(D, D), nn.LayerNorm(D))


def test_token_ops_before_the_final_norm_are_a_normalised_read() -> None:
    """Pooling over tokens (BEiT's `fc_norm(x[:, 1:].mean(1))`), concatenating other tokens (CaiT's
    `norm(cat(cls, x))`), padding or transposing tokens: each scales with the stream token by token."""
    reads = [
        lambda s, x: s.m2(x[:, 1:].mean(1)),
        lambda s, x: s.m2(torch.cat([torch.ones(x.shape[0], 1, D), x], dim=1)),
        lambda s, x: s.m2(F.pad(x, (0, 0, 1, 0)).transpose(0, 1)),
    ]
    for read in reads:
        stream = final_read(read)
        assert len(stream.sites) == 1 and not stream.unnormalized_reads


def test_an_op_that_mixes_features_or_adds_to_the_stream_before_the_norm_is_a_raw_read() -> None:
    reads = [
        lambda s, x: s.m2(x.mean(-1, keepdim=True).expand_as(x)),  # pools the features
        lambda s, x: s.m2(x[:, 1:] + 1.0),  # adds an unscaled tensor
        lambda s, x: s.m2(torch.cat([x, x], dim=-1)[..., :D]),  # concatenates features
    ]
    for read in reads:
        stream = final_read(read)
        assert len(stream.sites) == 1 and stream.unnormalized_reads


def test_a_view_that_merges_neighbouring_tokens_into_the_features_before_the_norm_is_a_normalised_read() -> None:
    """Swin's patch merging: [B, T, C] -> [B, T/2, 2C] moves whole feature vectors, then a norm over 2C; but once
    other (unscaled) tokens are joined, merging them into the stream's tokens is a raw read."""

    def merge(s, x):
        return s.m2(x.reshape(x.shape[0], -1, 2 * D))

    def join_then_merge(s, x):
        return s.m2(torch.cat([torch.ones(x.shape[0], 2, D), x], dim=1).reshape(x.shape[0], -1, 2 * D))

    for read, raw in ((merge, False), (join_then_merge, True)):
        modules = nn.LayerNorm(D), nn.Linear(D, D), nn.LayerNorm(2 * D)
        (stream,), _ = streams_of(lambda s, x, read=read: read(s, x + s.m1(s.m0(x))), *modules)
        assert len(stream.sites) == 1 and bool(stream.unnormalized_reads) == raw
