"""The suite's models: architectures from the zoo the tests cover, built from configs at three sizes.

Random weights (no download). Dropout is off so that a compiled run can be compared with an eager one; everything
else is the library's default. Each model takes positional inputs and its main output is a tensor or carries
`.logits`, as in PyTorch's dynamo benchmark harness.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..demo.model import Transformer


@dataclass(frozen=True)
class Size:
    """Width, depth and batch of one `--size`."""

    d: int
    layers: int
    heads: int
    batch: int
    seq: int  # tokens per sequence; image side for vision models is chosen to give about as many patches
    vocab: int = 1024


SIZES = {
    "tiny": Size(d=64, layers=4, heads=4, batch=2, seq=32),
    "small": Size(d=256, layers=8, heads=4, batch=2, seq=256),
    "medium": Size(d=768, layers=12, heads=12, batch=2, seq=512),
}


@dataclass(frozen=True)
class SuiteModel:
    """One entry of the suite: how to build it and its inputs, and the package it needs."""

    name: str
    what: str
    build: Callable[[Size], nn.Module]
    inputs: Callable[[Size, torch.Generator], tuple[Tensor, ...]]
    needs: str = "torch"


def _token_ids(size: Size, g: torch.Generator) -> tuple[Tensor, ...]:
    return (torch.randint(0, size.vocab, (size.batch, size.seq), generator=g),)


def _ids_and_labels(size: Size, g: torch.Generator) -> tuple[Tensor, ...]:
    ids = _token_ids(size, g)[0]
    return ids, ids


def _image_side(size: Size) -> int:
    return 8 * max(2, round(size.seq**0.5))  # patches of 8: about `seq` tokens


def _images(size: Size, g: torch.Generator) -> tuple[Tensor, ...]:
    return (torch.randn(size.batch, 3, _image_side(size), _image_side(size), generator=g),)


def _hf(model_type: str, **config: object) -> Callable[[Size], nn.Module]:
    def build(size: Size) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        base: dict[str, object] = dict(
            hidden_size=size.d,
            intermediate_size=4 * size.d,
            num_hidden_layers=size.layers,
            num_attention_heads=size.heads,
            num_key_value_heads=size.heads,
            vocab_size=size.vocab,
            max_position_embeddings=max(size.seq, 64),
            use_cache=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        cfg = AutoConfig.for_model(model_type, **{**base, **config})
        return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")

    return build


def _gpt2(size: Size) -> nn.Module:
    n = dict(n_embd=size.d, n_layer=size.layers, n_head=size.heads, n_positions=max(size.seq, 64))
    return _hf("gpt2", **n, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)(size)


def _qwen3_moe(size: Size) -> nn.Module:
    experts = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=size.d, decoder_sparse_step=1)
    return _hf("qwen3_moe", head_dim=size.d // size.heads, **experts)(size)


def _vit(size: Size) -> nn.Module:
    import timm

    depth = dict(embed_dim=size.d, depth=size.layers, num_heads=size.heads)
    return timm.create_model(
        "vit_base_patch16_224", pretrained=False, img_size=_image_side(size), patch_size=8, num_classes=1000, **depth
    )


def _handwritten(size: Size) -> nn.Module:
    return Transformer(d=size.d, layers=size.layers, heads=size.heads, vocab=size.vocab)


MODELS = {
    m.name: m
    for m in (
        SuiteModel("llama", "HF Llama, dense decoder", _hf("llama"), _token_ids, "transformers"),
        SuiteModel("qwen3_moe", "HF Qwen3-MoE, 4 experts top-2", _qwen3_moe, _token_ids, "transformers"),
        SuiteModel("gpt2", "HF GPT-2, LayerNorm and biases", _gpt2, _token_ids, "transformers"),
        SuiteModel(
            "gpt_neox",
            "HF GPT-NeoX, parallel residual",
            _hf("gpt_neox", hidden_dropout=0.0),
            _token_ids,
            "transformers",
        ),
        SuiteModel("vit", "timm ViT, LayerScale-free, class token", _vit, _images, "timm"),
        SuiteModel("handwritten", "hand-written Llama-style (the demo's), loss out", _handwritten, _ids_and_labels),
    )
}


def main_output(out: object) -> Tensor:
    """The tensor a model's result leads with: itself, `.logits`, or the first element."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return main_output(out[0])  # type: ignore[index]
