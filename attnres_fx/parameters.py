"""The new parameters: one pseudo-query and one key-norm weight per site that has several sources."""

from __future__ import annotations

import torch
from torch import nn

from .plan import Plan


class SiteParameters(nn.Module):
    """A site's pseudo-query (zero-init: uniform weights) and key RMSNorm weight (one-init)."""

    def __init__(self, dim: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))
        self.key_weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))


class AttnResParameters(nn.Module):
    """Holds every SiteParameters under the names the plan gives (`site_3`, `final`)."""

    def __init__(self, plan: Plan, dim: int, device: torch.device, dtype: torch.dtype):
        super().__init__()
        for site in plan.parametrised:
            self.add_module(site.name, SiteParameters(dim, device, dtype))
