"""The new parameters: one pseudo-query and one key-norm weight per site that has several sources."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import AttnResError
from .plan import Plan, StreamPlan


class SiteParameters(nn.Module):
    """A site's pseudo-query (zero-init: uniform weights) and key RMSNorm weight (one-init)."""

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.query = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.key_weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Zero query, unit key weight: the transformed model computes the original function."""
        self.query.zero_()
        self.key_weight.fill_(1.0)


class AttnResParameters(nn.Module):
    """One stream's parameters: the `attnres` submodule of a model with one transformed stream (`attnres.<stream>`
    with several). Every SiteParameters under the names the plan gives (`site_3`, `final`), the plan itself, and its
    settings in the state dict (`attnres._extra_state`), so that a checkpoint cannot silently load into a model
    transformed with other settings."""

    def __init__(self, plan: StreamPlan, dim: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.plan = plan
        self.model_plan: Plan | None = None  # the whole model's, where this is its `attnres`
        for site in plan.parametrised:
            self.add_module(site.name, SiteParameters(dim, device, dtype))

    def reset_parameters(self) -> None:
        """Back to the function-preserving init, e.g. after `to_empty()` on a model built on meta."""
        for site in self.children():
            site.reset_parameters()

    def get_extra_state(self) -> Tensor:
        return torch.tensor(self._settings()).as_subclass(Settings)

    def set_extra_state(self, state: Tensor) -> None:
        check_settings(tuple(int(v) for v in state.tolist()), self._settings())

    def _settings(self) -> tuple[int, int]:
        return (self.plan.block_size, len(self.plan.sites))


class AttnResStreams(nn.Module):
    """The `attnres` submodule of a model with several transformed streams: one AttnResParameters per stream."""

    def __init__(self, streams: list[AttnResParameters]):
        super().__init__()
        for params in streams:
            self.add_module(params.plan.name, params)
        self.model_plan: Plan | None = None  # the whole model's, set by transform

    def reset_parameters(self) -> None:
        for params in self.children():
            params.reset_parameters()


class Settings(Tensor):
    """`attnres._extra_state`, (block size, sublayers): a tensor to safetensors and `torch.save` (pickled as a plain
    one), and to `torch.distributed.checkpoint` a Stateful object, so that even a bare in-place
    `dcp.load(model.state_dict(), ...)`, which calls no method of the model, hands the saved settings to this check."""

    def state_dict(self) -> dict[str, Tensor]:
        return {"block_size": self[0].as_subclass(Tensor).clone(), "sublayers": self[1].as_subclass(Tensor).clone()}

    def load_state_dict(self, saved: dict[str, Tensor]) -> None:
        check_settings((int(saved["block_size"]), int(saved["sublayers"])), tuple(int(v) for v in self.tolist()))

    def __reduce_ex__(self, protocol: int):  # type: ignore[override]
        return self.as_subclass(Tensor).__reduce_ex__(protocol)


def check_settings(saved: tuple[int, ...], current: tuple[int, ...]) -> None:
    if saved != current:
        raise AttnResError(
            f"this checkpoint's AttnRes parameters were trained with block_size {saved[0]} over {saved[1]} "
            f"sublayers; this model was transformed with block_size {current[0]} over {current[1]} sublayers, so "
            f"they would compute another function. Transform the model with "
            f"`attnres_fx.transform(model, block_size={saved[0]})` before loading, or load without the `attnres.*` "
            "keys to start AttnRes afresh."
        )
