"""Graph optimisations over the rewritten graph, each a function `(GraphModule) -> None`.

Each pass is exact (same function as the plain rewrite) and can be switched off by leaving its
name out of `transform(..., passes=...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import AttnResError
from .two_phase import two_phase

GraphPass = Callable[[torch.fx.GraphModule], None]

PASSES: dict[str, GraphPass] = {"two_phase": two_phase}
DEFAULT_PASSES: tuple[str, ...] = tuple(PASSES)


def check_pass_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise AttnResError(f"unknown graph pass(es) {unknown}; the passes are {list(PASSES)}.")


def apply_passes(gm: torch.fx.GraphModule, names: Sequence[str]) -> None:
    for name in names:
        PASSES[name](gm)
    gm.graph.lint()
    gm.recompile()
