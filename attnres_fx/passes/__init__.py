"""Graph passes and the depth-attention optimisations.

- `functional_norms`: the forward of a layer that computes a stream-reading norm itself, rewritten one level deep.
- `transform(..., passes=...)` names the optimisations of the depth attention: `two_phase` scores all sublayers of
  a block against the completed blocks at once and merges each partial sum with online softmax (`ops.py`); without
  it, each sublayer runs one plain softmax over its sources.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import AttnResError

DEFAULT_PASSES: tuple[str, ...] = ("two_phase",)


def check_pass_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in DEFAULT_PASSES]
    if unknown:
        raise AttnResError(f"unknown pass(es) {unknown}; the passes are {list(DEFAULT_PASSES)}.")
