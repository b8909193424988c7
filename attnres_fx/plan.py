"""Plan blocks: cut each stream's residual sublayers into blocks and name each site's parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tabulate import tabulate

from .errors import AttnResError

PARAMETER_PREFIX = "attnres"


@dataclass(frozen=True)
class PlanSite:
    """One place where a sublayer (or the final norm) reads the stream through depth attention."""

    index: int  # sublayer index; the final aggregation has index == number of sublayers
    block: int  # the block this sublayer belongs to
    branch: tuple[str, ...]  # module paths computing the branch ("" = final aggregation)
    num_sources: int
    query: str | None  # state-dict names; None for site 0, which has one source
    key_weight: str | None
    eps: float

    @property
    def num_completed(self) -> int:
        """How many of the sources are completed blocks (the stream start included)."""
        return self.block + 1

    @property
    def has_partial(self) -> bool:
        """Whether the last source is the current block's partial sum."""
        return self.num_sources > self.num_completed

    @property
    def name(self) -> str:
        """`site_<j>` or `final`: the submodule of `attnres` holding this site's parameters."""
        return site_name(self.index, self.branch)


@dataclass(frozen=True)
class StreamPlan:
    """The ordered sites of one transformed stream and its final aggregation."""

    sites: tuple[PlanSite, ...]
    final: PlanSite
    block_size: int
    rewritten: tuple[str, ...] = ()  # layers whose forward computes a stream-reading norm: rewritten one level deep
    root: str = ""  # the module whose forward holds the stream (its residual adds)
    name: str = ""  # the submodule of `attnres` with its parameters; "" where it is the model's only stream

    @property
    def num_blocks(self) -> int:
        return math.ceil(len(self.sites) / self.block_size)

    @property
    def parametrised(self) -> tuple[PlanSite, ...]:
        return tuple(s for s in (*self.sites, self.final) if s.query is not None)

    def __str__(self) -> str:
        rows = [
            (
                s.index if s.branch else "final",
                s.block,
                ", ".join(s.branch) or "(final norm)",
                s.num_sources,
                s.query or "-",
                s.key_weight or "-",
            )
            for s in (*self.sites, self.final)
        ]
        where = f" in `{self.root or 'the model'}`" if self.name else ""  # one of several streams
        head = f"Block AttnRes{where}: {len(self.sites)} sublayers, block_size {self.block_size}, "
        head += f"{self.num_blocks} blocks\n"
        if self.rewritten:
            head += f"forward rewritten one level deep (computes a norm itself): {', '.join(self.rewritten)}\n"
        return head + tabulate(rows, headers=["site", "block", "branch", "sources", "query", "key norm weight"])


@dataclass(frozen=True)
class SkippedStream:
    """A pre-norm residual chain left exactly as it was, and why."""

    root: str
    sublayers: int
    reason: str


@dataclass(frozen=True)
class Plan:
    """What `transform` found in a model: the streams it transformed, in graph order, and those it left as they
    were. Where one stream was transformed, `sites`, `final`, `block_size`... are that stream's."""

    streams: tuple[StreamPlan, ...]
    skipped: tuple[SkippedStream, ...] = ()

    @property
    def only(self) -> StreamPlan:
        if len(self.streams) != 1:
            roots = ", ".join(f"`{s.root}`" for s in self.streams)
            raise AttnResError(f"this model has {len(self.streams)} transformed streams ({roots}): use `.streams`")
        return self.streams[0]

    @property
    def sites(self) -> tuple[PlanSite, ...]:
        return self.only.sites

    @property
    def final(self) -> PlanSite:
        return self.only.final

    @property
    def block_size(self) -> int:
        return self.only.block_size

    @property
    def num_blocks(self) -> int:
        return self.only.num_blocks

    @property
    def rewritten(self) -> tuple[str, ...]:
        return tuple(path for s in self.streams for path in s.rewritten)

    @property
    def parametrised(self) -> tuple[PlanSite, ...]:
        """Every site with parameters, stream by stream."""
        return tuple(site for s in self.streams for site in s.parametrised)

    def __str__(self) -> str:
        parts = [str(s) for s in self.streams]
        for s in self.skipped:
            parts.append(f"left as it was: `{s.root or '(the model)'}` ({s.sublayers} sublayers): {s.reason}")
        return "\n\n".join(parts)


def site_name(j: int, branch: tuple[str, ...]) -> str:
    return f"site_{j}" if branch else "final"


def num_sources(j: int, block_size: int) -> int:
    """Sources read by sublayer j: the stream start, the completed blocks, the partial sum if any."""
    return 1 + j // block_size + (1 if j % block_size else 0)


def make_plan(
    branches: list[tuple[str, ...]],
    eps: list[float],
    final_eps: float,
    num_blocks: int,
    block_size: int | None,
    rewritten: tuple[str, ...] = (),
    root: str = "",
    name: str = "",
) -> StreamPlan:
    """Assign each of one stream's sublayers (given by their branch modules) to blocks."""
    count = len(branches)
    size = block_size or max(1, math.ceil(count / num_blocks))
    prefix = ".".join(p for p in (PARAMETER_PREFIX, name) if p)

    def site(j: int, branch: tuple[str, ...], e: float) -> PlanSite:
        n = num_sources(j, size)
        site_path = f"{prefix}.{site_name(j, branch)}"
        has_params = n > 1
        return PlanSite(
            index=j,
            block=j // size,
            branch=branch,
            num_sources=n,
            query=f"{site_path}.query" if has_params else None,
            key_weight=f"{site_path}.key_weight" if has_params else None,
            eps=e,
        )

    sites = tuple(site(j, b, e) for j, (b, e) in enumerate(zip(branches, eps)))
    return StreamPlan(sites, site(count, (), final_eps), size, rewritten, root, name)
