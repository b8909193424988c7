"""The new parameters: one pseudo-query and one key-norm weight per site that has several sources."""

from __future__ import annotations

import torch
from torch import nn

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
    """Holds every SiteParameters under the names the plan gives (`site_3`, `final`)."""

    def __init__(self, plan: Plan, dim: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        for site in plan.parametrised:
            self.add_module(site.name, SiteParameters(dim, device, dtype))

    def reset_parameters(self) -> None:
        """Back to the function-preserving init, e.g. after `to_empty()` on a model built on meta."""
        for site in self.children():
            site.reset_parameters()
