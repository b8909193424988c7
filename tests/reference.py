"""An independent, hand-written Block AttnRes, following the paper's pseudocode.

The computation does not use attnres_fx: it calls the model's own submodules one sublayer at a time
and mixes the sources itself. Tests compare a transformed model against it with non-zero queries;
`random_site_parameters_` only reads the transformed model's plan to hand the reference its parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import attnres_fx
from attnres_fx.parameters import SiteParameters
from attnres_fx.plan import StreamPlan

Sublayer = Callable[[Tensor], Tensor]


def mix(sources: list[Tensor], query: Tensor, key_weight: Tensor, eps: float) -> Tensor:
    """softmax_i(q . rmsnorm_g(v_i)) weighted sum of v_i, in fp32."""
    values = torch.stack(sources).float()
    keys = F.rms_norm(values, (values.shape[-1],), key_weight.float(), eps)
    weights = torch.einsum("d,n...d->n...", query.float(), keys).softmax(0)
    return torch.einsum("n...,n...d->...d", weights, values).to(sources[0].dtype)


def block_attnres(
    start: Tensor,
    sublayers: Sequence[Sublayer],
    params: Sequence[tuple[Tensor, Tensor] | None],
    block_size: int,
    eps: float,
) -> Tensor:
    """The final aggregated stream. params[j] = (query, key weight) of sublayer j; the last entry is the final's."""
    blocks, partial = [start], None
    for j, f in enumerate(sublayers):
        sources = blocks + ([partial] if partial is not None else [])
        h = sources[0] if len(sources) == 1 else mix(sources, *params[j], eps)
        out = f(h)
        partial = out if partial is None else partial + out
        if (j + 1) % block_size == 0:
            blocks.append(partial)
            partial = None
    return mix(blocks + ([partial] if partial is not None else []), *params[-1], eps)


def random_site_parameters_(tmodel: nn.Module, seed: int = 0) -> list:
    """Random queries and key weights; returns the only stream's `stream_parameters`."""
    randomise_sites_(tmodel, seed)
    return stream_parameters(tmodel, attnres_fx.plan(tmodel).only)


def randomise_sites_(tmodel: nn.Module, seed: int = 0) -> None:
    """Random queries and key weights in every stream."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for site in tmodel.attnres.modules():
            if isinstance(site, SiteParameters):
                site.query.copy_(0.5 * torch.randn(site.query.shape, generator=g))
                site.key_weight.copy_(1 + 0.3 * torch.randn(site.key_weight.shape, generator=g))


def stream_parameters(tmodel: nn.Module, stream: StreamPlan) -> list:
    """Per site of `stream` (q, g) or None, the final's last."""
    return [
        (tmodel.get_parameter(s.query), tmodel.get_parameter(s.key_weight)) if s.query else None
        for s in (*stream.sites, stream.final)
    ]

def llama_reference(model: nn.Module, ids: Tensor, params, block_size: int) -> Tensor:
    inner = model.model
    h = inner.embed_tokens(ids)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    rope = inner.rotary_emb(h, pos)
    sublayers: list[Sublayer] = []
    for layer in inner.layers:
        sublayers.append(
            lambda x, l=layer: l.self_attn(l.input_layernorm(x), position_embeddings=rope, attention_mask=None)[0]
        )
        sublayers.append(lambda x, l=layer: l.mlp(l.post_attention_layernorm(x)))
    final = block_attnres(h, sublayers, params, block_size, inner.norm.variance_epsilon)
    return model.lm_head(inner.norm(final))


def gpt2_reference(model: nn.Module, ids: Tensor, params, block_size: int) -> Tensor:
    tr = model.transformer
    h = tr.drop(tr.wte(ids) + tr.wpe(torch.arange(ids.shape[1])))
    sublayers: list[Sublayer] = []
    for block in tr.h:
        sublayers.append(lambda x, b=block: b.attn(b.ln_1(x))[0])
        sublayers.append(lambda x, b=block: b.mlp(b.ln_2(x)))
    final = block_attnres(h, sublayers, params, block_size, tr.ln_f.eps)
    return model.lm_head(tr.ln_f(final))


def vit_reference(model: nn.Module, images: Tensor, params, block_size: int) -> Tensor:
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    sublayers: list[Sublayer] = []
    for blk in model.blocks:
        sublayers.append(lambda x, b=blk: b.drop_path1(b.ls1(b.attn(b.norm1(x)))))
        sublayers.append(lambda x, b=blk: b.drop_path2(b.ls2(b.mlp(b.norm2(x)))))
    final = block_attnres(x, sublayers, params, block_size, model.norm.eps)
    return model.forward_head(model.norm(final))
