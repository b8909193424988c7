"""The new parameters: one pseudo-query and one key-norm weight per site that has several sources."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .errors import AttnResError
from .plan import Plan


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
    """The `attnres` submodule of a transformed model: every SiteParameters under the names the plan gives
    (`site_3`, `final`), the plan itself, and its settings in the state dict (`attnres._extra_state`), so that a
    checkpoint cannot silently load into a model transformed with other settings."""

    def __init__(self, plan: Plan, dim: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.plan = plan
        for site in plan.parametrised:
            self.add_module(site.name, SiteParameters(dim, device, dtype))

    def reset_parameters(self) -> None:
        """Back to the function-preserving init, e.g. after `to_empty()` on a model built on meta."""
        for site in self.children():
            site.reset_parameters()

    def get_extra_state(self) -> Tensor:
        return torch.tensor(self._settings())

    def set_extra_state(self, state: Tensor) -> None:
        saved = tuple(int(v) for v in state.tolist())
        if saved != self._settings():
            raise AttnResError(
                f"this checkpoint's AttnRes parameters were trained with block_size {saved[0]} over {saved[1]} "
                f"sublayers; this model was transformed with block_size {self.plan.block_size} over "
                f"{len(self.plan.sites)} sublayers, so they would compute another function. Transform the model "
                f"with `attnres_fx.transform(model, block_size={saved[0]})` before loading, or load without the "
                "`attnres.*` keys to start AttnRes afresh."
            )

    def _settings(self) -> tuple[int, int]:
        return (self.plan.block_size, len(self.plan.sites))
