"""Everything attnres_fx knows about Hugging Face transformers models, in one place.

Nothing here imports transformers: models are recognised by what they carry (a `config`, `main_input_name`,
`set_experts_implementation`), so the package works without it installed.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .plan import Plan

_CAPTURABLE_EXPERTS = "grouped_mm"


def without_kv_cache(kwargs: dict[str, Any], keeps_cache: bool) -> dict[str, Any]:
    """A call's keywords for capture: no KV cache (a cache object cannot be exported) where the model keeps one
    and the call did not say."""
    if "use_cache" in kwargs or not keeps_cache:
        return kwargs
    return {**kwargs, "use_cache": False}


def keeps_kv_cache(model: nn.Module) -> bool:
    """Whether calls return a KV cache unless told `use_cache=False`. Decided from the config, not the forward's
    signature, so wrappers whose forward takes `**kwargs` (PEFT, torch.compile) get the model's own answer."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config  # a VLM's language model
    if getattr(config, "use_cache", None) is None and getattr(text, "use_cache", None) is None:
        return False
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "use_cache" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def use_capturable_experts(model: nn.Module) -> str | None:
    """Switch MoE experts from the per-expert Python loop (`eager`, which no capture can trace) to the numerically
    equivalent `grouped_mm`; returns what was done, for the user, or None."""
    config = getattr(model, "config", None)
    if getattr(config, "_experts_implementation", None) != "eager" or not hasattr(model, "set_experts_implementation"):
        return None
    try:
        model.set_experts_implementation(_CAPTURABLE_EXPERTS)
    except ValueError:  # transformers' answer for models without switchable experts (all dense ones)
        return None
    return (
        f"{type(model).__name__} used the `eager` experts loop, whose data-dependent shapes no capture can trace; "
        f"switched it to `{_CAPTURABLE_EXPERTS}` (same function, one grouped matmul per projection). Build the model "
        f"with experts_implementation='{_CAPTURABLE_EXPERTS}' to silence this."
    )


def example_inputs(model: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, Any] | None:
    """One example call built from the config: the model's `main_input_name` (token ids for text models, images for
    vision encoders such as ViT, DINOv2, SigLIP, log-mel features for speech encoders such as Whisper's), and decoder
    ids for an encoder-decoder model (T5, Whisper); else None."""
    config = getattr(model, "config", None)
    image_inputs = _image_and_text_inputs(config, device, dtype)
    if image_inputs is not None:
        return image_inputs
    inputs = _main_inputs(model, device, dtype)
    if inputs is not None and getattr(config, "is_encoder_decoder", False) and getattr(config, "vocab_size", None):
        inputs["decoder_input_ids"] = torch.randint(0, config.vocab_size, (2, 8), device=device)
    return inputs


def _image_and_text_inputs(config: Any, device: torch.device, dtype: torch.dtype) -> dict[str, Any] | None:
    """A vision-language model's call (LLaVA-style config: a vision tower's image and patch size, an image token):
    an image, and text that holds one image token per patch feature, so that both towers run."""
    vision = getattr(config, "vision_config", None)
    token = getattr(config, "image_token_index", getattr(config, "image_token_id", None))
    size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
    if token is None or not isinstance(size, int) or not isinstance(patch, int):
        return None
    features = (size // patch) ** 2 + (getattr(config, "vision_feature_select_strategy", "default") == "full")
    vocab = config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (2, 8), device=device)
    ids = ids.masked_fill(ids == token, 0)
    ids = torch.cat([torch.full((2, features), token, device=device), ids], dim=1)
    pixels = torch.randn(2, getattr(vision, "num_channels", 3), size, size, device=device, dtype=dtype)
    return {"input_ids": ids, "pixel_values": pixels}


def _main_inputs(model: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    name = getattr(model, "main_input_name", None)
    if name == "input_ids" and getattr(config, "vocab_size", None):
        max_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 16
        return {"input_ids": torch.randint(0, config.vocab_size, (2, min(16, max_len)), device=device)}
    if name == "pixel_values" and getattr(config, "image_size", None):
        size = config.image_size if isinstance(config.image_size, (tuple, list)) else (config.image_size,) * 2
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(2, channels, *size, device=device, dtype=dtype)}
    if (
        name == "input_features"
        and getattr(config, "num_mel_bins", None)
        and getattr(config, "max_source_positions", None)
    ):
        frames = 2 * config.max_source_positions  # the encoder's two convolutions halve the frames once
        return {"input_features": torch.randn(2, config.num_mel_bins, frames, device=device, dtype=dtype)}
    return None


SETTINGS_KEY = "attnres"  # under this name in an HF config: what `save_pretrained` writes to config.json


def record_settings(model: nn.Module, plan: Plan, num_blocks: int, block_size: int | None) -> None:
    """Put the AttnRes settings into an HF model's config, so that `save_pretrained` writes them: one stream's block
    size and sublayers; with several, the options that cut them and which streams."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return
    if len(plan.streams) == 1:
        settings: dict[str, Any] = {"block_size": plan.block_size, "sublayers": len(plan.sites)}
    else:
        settings = {"num_blocks": num_blocks, "block_size": block_size, "streams": [s.root for s in plan.streams]}
    setattr(config, SETTINGS_KEY, settings)


def saved_settings(model: nn.Module) -> dict[str, Any] | None:
    return getattr(getattr(model, "config", None), SETTINGS_KEY, None)


def attnres_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The `attnres.*` tensors of a checkpoint folder written by `save_pretrained` (one or sharded safetensors)."""
    from safetensors import safe_open

    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    tensors = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(SETTINGS_KEY + ".")})
    return tensors


def is_pipelinable(model: nn.Module) -> bool:
    """Whether `pipeline.pipeline_split` can run stages of `model`: an HF model whose base model takes the hidden
    state as `inputs_embeds`."""
    base = getattr(model, "base_model", None)
    return isinstance(base, nn.Module) and "inputs_embeds" in inspect.signature(type(base).forward).parameters


class StageCall:
    """How a stage copy of an HF model runs on its input: token ids into the first stage, the hidden state as
    `inputs_embeds` into the others; the last returns the logits, the others the base model's last hidden state
    (their final norm is an identity). Class forwards where the module's own forward is the stage's."""

    def __init__(self, model: nn.Module, first: bool, last: bool):
        self.model, self.first, self.last = model, first, last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        inputs = {"input_ids" if self.first else "inputs_embeds": x, "use_cache": False}
        if self.last:
            return type(self.model).forward(self.model, **inputs).logits
        base = self.model.base_model
        out = type(base).forward(base, **inputs) if base is self.model else base(**inputs)
        return out.last_hidden_state
