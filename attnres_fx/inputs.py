"""Example inputs: the user's, normalised, or built from a model's own config when we can."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import hf
from .errors import AttnResError

ExampleInputs = tuple[Any, ...] | dict[str, Any] | Tensor


def as_call(example_inputs: ExampleInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A tuple is positional args, a dict keyword args, a tensor the single positional arg."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs, {}
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    raise AttnResError(
        f"example_inputs must be a tuple of positional args, a dict of keyword args or a tensor; "
        f"got {type(example_inputs).__name__}."
    )


def default_example_inputs(model: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Built from a Hugging Face config (token ids, images, speech features) or a timm model's input size;
    otherwise ask the user."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    from_config = hf.example_inputs(model, device, dtype)
    if from_config is not None:
        return (), from_config
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(pretrained_cfg, dict) and pretrained_cfg.get("input_size"):
        channels, *size = pretrained_cfg["input_size"]
        size = _built_image_size(model) or size
        return (torch.randn(2, channels, *size, device=device, dtype=dtype),), {}
    raise AttnResError(
        f"attnres_fx cannot guess inputs for {type(model).__name__}: it builds them only for Hugging "
        "Face models whose `main_input_name` is input_ids, pixel_values or input_features (from their config) "
        "and timm models (images of the size their patch embedding was built for, else of "
        "`pretrained_cfg['input_size']`). Pass `example_inputs=` a tuple of positional "
        "args or a dict of keyword args that the model accepts, e.g. `transform(model, (torch.randn(2, 16, 64),))`."
    )


def _built_image_size(model: nn.Module) -> list[int] | None:
    """The image size a timm model was built for (`create_model(..., img_size=64)`), where its patch embedding keeps
    it: `pretrained_cfg` keeps the pretrained size."""
    for module in model.modules():
        size = getattr(module, "img_size", None)
        if isinstance(size, int):
            return [size, size]
        if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
            return list(size)
    return None
