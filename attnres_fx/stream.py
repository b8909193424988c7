"""Find the residual stream: the chain of pre-norm residual adds in a captured graph.

An add `h + d` is a pre-norm residual when both operands have the output's shape and the stream `h`
reaches the branch `d` only through normalisation: every first step from `h` towards `d` is a norm
node. Norms are recognised by what they compute (layer_norm / rms_norm / group_norm ops, an rsqrt / sqrt of
a mean, or an L2 norm over the features, inside one module), never by a module's name.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

aten = torch.ops.aten

_ADDS = {aten.add.Tensor, aten.add_.Tensor}
_NORM_OPS = {
    aten.layer_norm.default,
    aten.native_layer_norm.default,
    aten.rms_norm.default,
    aten.group_norm.default,
    aten.native_group_norm.default,
}
_ROOT_OPS = {aten.rsqrt.default, aten.sqrt.default}
_STAT_OPS = {aten.mean.dim, aten.mean.default, aten.var.correction, aten.var_mean.correction}
_ALIAS_OPS = {
    aten.to.dtype,
    aten.to.dtype_layout,
    aten.to.device,
    aten.to.other,
    aten._to_copy.default,
    aten.clone.default,
    aten.alias.default,
    aten.contiguous.default,
}
_VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_MATMUL_OPS = {
    aten.linear.default,
    aten.mm.default,
    aten.addmm.default,
    aten.bmm.default,
    aten.matmul.default,
    aten.einsum.default,
    aten.conv1d.default,
    aten.conv2d.default,
    aten.convolution.default,
    aten._grouped_mm.default,
}
DEFAULT_EPS = 1e-6


@dataclass
class Site:
    """One residual sublayer: `add = stream + sum(branches)`; a parallel layer written `(h + a) + m` has two
    branches, and its inner add `h + a` is part of the sublayer."""

    add: Node
    stream: Node
    branches: tuple[Node, ...]
    branch_modules: tuple[str, ...]
    eps: float
    inner_adds: tuple[Node, ...] = ()
    readers: tuple[Node, ...] = ()  # the norm nodes that read `stream` (filled once the chain is known)

    @property
    def reader_paths(self) -> tuple[str, ...]:
        """The modules that compute those norms."""
        return tuple(dict.fromkeys(module_path(r) for r in self.readers))


@dataclass
class UnnormalizedRead:
    """A node that reads a stream value without a norm in between."""

    reader: Node
    module: str
    stream_index: int  # which stream value: 0 = the start, j = the output of sublayer j-1


@dataclass
class RawResidual:
    """An add `h + f(h)` whose branch reads `h` without a norm first: what was found, for the refusal."""

    module: str  # the module whose forward holds the add
    first_read: str  # the op that reads `h` first in the branch
    first_read_module: str
    post_norm: bool  # the sum is normalised after the add (BERT)
    branch_normed: bool  # the branch output is normalised before the add (OLMo2)


@dataclass
class Stream:
    """One residual chain: its start, its sites in order, and how its final value is normalised."""

    start: Node
    sites: list[Site]
    final_eps: float
    unnormalized_reads: list[UnnormalizedRead]
    final_readers: tuple[Node, ...] = ()  # the norm nodes that read the final stream value
    feature_dim: int = -1  # the stream's feature (channel) dim, from the end: -3 for a channels-first N,C,H,W

    @property
    def final_reader_paths(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(module_path(r) for r in self.final_readers))


def module_path(node: Node) -> str:
    """The innermost module that recorded `node` ('' for the root)."""
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else ""


def module_paths(node: Node) -> list[str]:
    """The modules that recorded `node`, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return list(dict.fromkeys(path for path, _ in stack.values()))  # the adapter and the model are both ''


def module_calls(node: Node) -> list[tuple[str, int]]:
    """The module calls that recorded `node`, outermost first: (path, which call of that module it was, from 0); export
    tells the calls of a module called more than once apart (`layers.0@1`)."""
    stack = node.meta.get("nn_module_stack") or {}
    calls: dict[str, int] = {}
    for key, (path, _) in stack.items():
        count = key.rpartition("@")[2]
        calls[path] = int(count) if "@" in key and count.isdigit() else 0
    return list(calls.items())


def is_tensor(node: object) -> bool:
    """Whether `node` carries tensor data (a tensor, or a tuple of them as from split / chunk)."""
    if not isinstance(node, Node):
        return False
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) or (
        isinstance(val, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in val)
    )


def find_streams(graph: Graph) -> tuple[list[Stream], list[RawResidual]]:
    """Every pre-norm residual chain in `graph`, in graph order (an encoder's before its decoder's, a vision tower's
    before the language model's, one per stage of a hierarchical backbone), and the residual adds that are not
    pre-norm (for the refusal where there is no chain)."""
    return _StreamFinder(graph).find()


class _StreamFinder:
    def __init__(self, graph: Graph):
        self.nodes = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.by_path: dict[str, list[Node]] = defaultdict(list)
        for n in self.nodes:
            self.by_path[module_path(n)].append(n)
        # a module computing a norm by hand counts as a norm, unless it also adds activations of equal shape: then it
        # is a layer that normalises inline, and its other reads of the stream are not normalised
        self.norm_paths = {p for p, ns in self.by_path.items() if p and _computes_norm(ns) and not _holds_adds(ns)}

    def is_norm(self, n: Node) -> bool:
        return n.target in _NORM_OPS or module_path(n) in self.norm_paths

    def find(self) -> tuple[list[Stream], list[RawResidual]]:
        sites: dict[Node, Site] = {}
        raw_residuals: list[RawResidual] = []
        for n in self.nodes:
            if n.op != "call_function" or n.target not in _ADDS or not _is_plain_add(n):
                continue
            site, raw = self._classify_add(n)
            site = site or self._parallel_extension(n, sites)
            if site is not None:
                sites[n] = site
                for inner in site.inner_adds:
                    sites.pop(inner, None)
            elif raw:
                raw_residuals.append(raw)
        return [self._stream(chain) for chain in self._chains(sites)], raw_residuals

    def _stream(self, chain: list[Site]) -> Stream:
        values = [chain[0].stream] + [s.add for s in chain]
        adds = _chain_adds(chain)
        for site in chain:
            site.readers = self._norm_readers(site.stream, adds)
        final_eps = self._eps_of_readers(values[-1])
        reads = self._unnormalized_reads(values, chain)
        final_readers = self._norm_readers(values[-1], adds)
        feature_dim = _feature_dim(chain[0].readers, chain[0].stream)
        return Stream(chain[0].stream, chain, final_eps, reads, final_readers, feature_dim)

    # --- one add -------------------------------------------------------------------------------

    def _classify_add(self, add: Node) -> tuple[Site | None, RawResidual | None]:
        """(site, None) for a pre-norm residual; (None, what was found) for `h + f(h)` with f reading h raw."""
        raw = None
        for x, y in (add.args[:2], add.args[1::-1]):
            stream = self.root(x)
            ancestors = self._ancestors(y, stop_before=self.index[stream])
            if stream not in ancestors:
                continue
            first_steps = [u for u in self._tensor_readers(stream) if u in ancestors or u is y]
            region = self._between(stream, ancestors)
            if first_steps and all(self.is_norm(u) for u in first_steps):
                return Site(add, stream, (y,), self._branch_modules(add, region), self._eps_of_readers(stream)), None
            if raw is None and any(r.target in _MATMUL_OPS for r in region):
                first = next(u for u in first_steps if not self.is_norm(u))
                post_norm = any(self.is_norm(r) for r in self._tensor_readers(add) if r.op != "output")
                branch_normed = self.is_norm(self.root(y))
                raw = RawResidual(module_path(add), _op_name(first), module_path(first), post_norm, branch_normed)
        return None, raw

    def _parallel_extension(self, add: Node, sites: dict[Node, Site]) -> Site | None:
        """`(h + a) + m` where `h + a` is a site and `m` reads `h` through a norm: one parallel sublayer."""
        for x, y in (add.args[:2], add.args[1::-1]):
            inner = sites.get(self.root(x))
            if inner is None:
                continue
            ancestors = self._ancestors(y, stop_before=self.index[inner.stream])
            first_steps = [u for u in self._tensor_readers(inner.stream) if u in ancestors or u is y]
            if inner.add in ancestors or not first_steps or not all(self.is_norm(u) for u in first_steps):
                continue
            modules = self._branch_modules(add, self._between(inner.stream, ancestors))
            return Site(
                add,
                inner.stream,
                (*inner.branches, y),
                tuple(dict.fromkeys((*inner.branch_modules, *modules))),
                inner.eps,
                (*inner.inner_adds, inner.add),
            )
        return None

    def root(self, n: Node) -> Node:
        """Look through ops that return their input's values (a `.to()` to the same dtype, clone, a reshape that
        keeps the feature dim...)."""
        while _passes_values_through(n):
            n = n.args[0]
        return n

    def _tensor_readers(self, value: Node) -> list[Node]:
        """Tensor-valued readers of `value`, looking through ops that pass its values on. Such an op inside a norm
        (Llama's `x.to(float32)`, an alias in fp32) is the norm's read, but what outside the norm reads the op's
        result reads the stream raw (a returned hidden state, a residual add): those are readers too."""
        readers, todo = [], [(value, None)]
        while todo:
            node, norm = todo.pop()
            for u in node.users:
                if norm is not None and _inside(u, norm):
                    continue  # the norm's own computation
                if not is_tensor(u) or u.op == "output":
                    if u.op == "output":
                        readers.append(u)
                    continue
                if _passes_values_through(u) and not self.is_norm(u):
                    todo.append((u, None))
                    continue
                readers.append(u)
                if _passes_values_through(u) and u.target not in _NORM_OPS:
                    todo.append((u, module_path(u)))
        return readers

    def _ancestors(self, node: Node, stop_before: int) -> set[Node]:
        """Tensor-valued ancestors of `node` (itself included) at or after position `stop_before`."""
        seen, todo = {node}, [node]
        while todo:
            for a in todo.pop().all_input_nodes:
                if a not in seen and is_tensor(a) and self.index[a] >= stop_before:
                    seen.add(a)
                    todo.append(a)
        return seen

    def _between(self, stream: Node, ancestors: set[Node]) -> list[Node]:
        """Nodes on a path from `stream` into the branch, in graph order."""
        seen, todo = set(), [stream]
        while todo:
            for u in todo.pop().users:
                if u in ancestors and u not in seen:
                    seen.add(u)
                    todo.append(u)
        return sorted(seen, key=self.index.__getitem__)

    def _branch_modules(self, add: Node, region: list[Node]) -> tuple[str, ...]:
        """The modules one level below the add's module that compute the branch (norms left out)."""
        owner = module_path(add)
        found: dict[str, None] = {}
        for n in region:
            paths = module_paths(n)
            below = paths[paths.index(owner) + 1 :] if owner in paths else []
            if below and below[0] not in self.norm_paths:
                found[below[0]] = None
        return tuple(found) or (owner,)

    # --- the chain -----------------------------------------------------------------------------

    def _chains(self, sites: dict[Node, Site]) -> list[list[Site]]:
        """The chains of sites, each from a site whose stream is no site's output, in graph order."""
        next_of: dict[Node, Site] = {}
        for site in sites.values():
            next_of.setdefault(site.stream, site)
        chains = []
        for site in sites.values():
            if site.stream in sites:
                continue  # not a chain start
            chain = [site]
            while chain[-1].add in next_of:
                chain.append(next_of[chain[-1].add])
            chains.append(chain)
        return chains

    def _norm_readers(self, value: Node, adds: set[Node]) -> tuple[Node, ...]:
        """The norm nodes that read `value` (the chain's own adds left out)."""
        readers = self._tensor_readers(value)
        return tuple(r for r in readers if r not in adds and r.op != "output" and self.is_norm(r))

    def _unnormalized_reads(self, values: list[Node], chain: list[Site]) -> list[UnnormalizedRead]:
        adds = _chain_adds(chain)
        reads = []
        for i, value in enumerate(values):
            for r in self._tensor_readers(value):
                if r in adds or (r.op != "output" and self.is_norm(r)):
                    continue
                if i == len(values) - 1 and self._normalised_through_token_ops(r):
                    continue  # the final value, pooled or with other tokens, then normalised per token
                reads.append(UnnormalizedRead(r, module_path(r), i))
        return reads

    def _normalised_through_token_ops(self, node: Node, joined: bool = False) -> bool:
        """`node` is an op that scales with its stream input token by token (a slice or select of tokens, a
        concatenation with other tokens, a mean or sum over tokens, padding or transposing tokens, a view that merges
        neighbouring tokens into one, as Swin's patch merging does), and everything it feeds is such an op or a norm:
        at zero init the depth mix in place of the stream changes nothing there. Once other tokens are joined, no
        view may merge them into the stream's tokens (`joined`)."""
        view = _view_of_tokens(node)
        if not (_is_token_op(node) or view == "keeps" or (view == "merges" and not joined)):
            return False
        joined = joined or node.target is aten.cat.default
        readers = [u for u in node.users if is_tensor(u)]
        return bool(readers) and all(
            u.op != "output" and (self.is_norm(u) or self._normalised_through_token_ops(u, joined)) for u in readers
        )

    # --- eps -----------------------------------------------------------------------------------

    def _eps_of_readers(self, value: Node) -> float:
        """The eps of the norm that reads `value`: the key RMSNorm uses the model's own eps."""
        for r in self._tensor_readers(value):
            if r.op == "output" or not self.is_norm(r):
                continue
            eps = _norm_eps([r]) if r.target in _NORM_OPS else _norm_eps(self.by_path[module_path(r)])
            if eps is not None:
                return eps
        return DEFAULT_EPS


def _feature_dim(readers: tuple[Node, ...], stream: Node) -> int:
    """The dim a sublayer's norm normalises the stream over (from the end): the channels of a group norm, the dim a
    permute or transpose moves last before a layer norm (timm's LayerNorm2d), otherwise the last."""
    ndim = stream.meta["val"].dim()
    for r in readers:
        if r.target in (aten.group_norm.default, aten.native_group_norm.default):
            return 1 - ndim
        if r.target is aten.permute.default:
            return r.args[1][-1] % ndim - ndim
        if r.target is aten.transpose.int and (ndim - 1) in (r.args[1] % ndim, r.args[2] % ndim):
            a, b = r.args[1] % ndim, r.args[2] % ndim
            return (a if b == ndim - 1 else b) - ndim
    return -1


def _is_token_op(n: Node) -> bool:
    """An op that keeps each token's features as they are, up to a common scale: it moves, picks, pads, pools or
    concatenates along dims other than the last (the features)."""
    if n.op != "call_function" or not n.args or not isinstance(n.meta.get("val"), torch.Tensor):
        return False
    first = n.args[0][0] if n.target is aten.cat.default else n.args[0]
    if not isinstance(first, Node) or not isinstance(first.meta.get("val"), torch.Tensor):
        return False
    ndim = first.meta["val"].dim()
    last = ndim - 1

    def arg(i: int, default: object) -> object:
        return n.args[i] if len(n.args) > i else default

    if n.target in (aten.slice.Tensor, aten.select.int, aten.unsqueeze.default, aten.squeeze.dim):
        return arg(1, 0) % max(ndim, 1) != last
    if n.target is aten.cat.default:
        return arg(1, 0) % ndim != last
    if n.target in (aten.mean.dim, aten.sum.dim_IntList):
        dims = arg(1, None)
        return dims is not None and all(d % ndim != last for d in dims)
    if n.target is aten.transpose.int:
        return last not in (arg(1, 0) % ndim, arg(2, 0) % ndim)
    if n.target is aten.permute.default:
        return arg(1, [])[-1] % ndim == last
    if n.target in (aten.constant_pad_nd.default, aten.pad.default):
        return tuple(arg(1, (0, 0))[:2]) == (0, 0)
    return False


def _view_of_tokens(n: Node) -> str | None:
    """For a view (reshape, flatten): "keeps" the feature dim, or "merges" whole feature vectors of several tokens
    into it (Swin's patch merging flattens [..., 2, 2, C] into [..., 4C]): data moved, never mixed. Else None."""
    if n.target not in (*_VIEW_OPS, aten.flatten.using_ints) or not isinstance(n.args[0], Node):
        return None
    a, b = n.args[0].meta.get("val"), n.meta.get("val")
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() >= 1 and b.dim() >= 1):
        return None
    if a.dtype != b.dtype:
        return None
    if _same_size(a.shape[-1], b.shape[-1]):
        return "keeps"
    return "merges" if statically_known_true(sym_eq(b.shape[-1] % a.shape[-1], 0)) else None


def _holds_adds(nodes: list[Node]) -> bool:
    return any(n.op == "call_function" and n.target in _ADDS and _is_plain_add(n) for n in nodes)


def _computes_norm(nodes: list[Node]) -> bool:
    targets = {n.target for n in nodes}
    by_stats = bool(targets & _ROOT_OPS and targets & _STAT_OPS)  # rsqrt(mean(x^2) + eps), by hand
    return bool(targets & _NORM_OPS) or by_stats or any(_is_feature_l2_norm(n) for n in nodes)


def _is_feature_l2_norm(n: Node) -> bool:
    """The L2 norm of each token's features (`F.normalize(x, dim=-1)`, `linalg.vector_norm(x, dim=-1)`): what
    RMSNorm and ScaleNorm written as `normalize(x) * sqrt(d) * g` compute. Over another dim it mixes tokens."""
    if n.target is not aten.linalg_vector_norm.default or not isinstance(n.args[0], Node):
        return False
    order = n.args[1] if len(n.args) > 1 else n.kwargs.get("ord", 2)
    dims = n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")
    ndim = n.args[0].meta["val"].dim()
    return order == 2 and dims is not None and [d % ndim for d in dims] == [ndim - 1]


def _norm_eps(nodes: list[Node]) -> float | None:
    for n in nodes:
        if n.target in (aten.layer_norm.default, aten.native_layer_norm.default):
            return float(n.args[4]) if len(n.args) > 4 else float(n.kwargs.get("eps", 1e-5))
        if n.target == aten.rms_norm.default and len(n.args) > 3 and n.args[3] is not None:
            return float(n.args[3])
        if n.target in _ROOT_OPS:
            arg = n.args[0]
            if isinstance(arg, Node) and arg.target == aten.add.Tensor and isinstance(arg.args[1], (int, float)):
                return float(arg.args[1])
    return None


def _passes_values_through(n: Node) -> bool:
    """An alias of its input (same dtype and shape), or a view of it that keeps the feature (last) dim."""
    if n.op != "call_function" or not n.args:
        return False
    if n.target in _ALIAS_OPS:
        return _same_tensor_type(n, n.args[0])
    if n.target in _VIEW_OPS and isinstance(n.args[0], Node) and isinstance(n.args[0].meta.get("val"), torch.Tensor):
        a, b = n.meta.get("val"), n.args[0].meta["val"]
        return (
            isinstance(a, torch.Tensor) and a.dtype == b.dtype and a.dim() >= 1 and _same_size(a.shape[-1], b.shape[-1])
        )
    return False


def _op_name(node: Node) -> str:
    target = node.target
    return str(getattr(target, "__name__", target)).removesuffix(".default") if node.op == "call_function" else node.op


def _inside(node: Node, module: str) -> bool:
    path = module_path(node)
    return path == module or path.startswith(module + ".")


def _chain_adds(chain: list[Site]) -> set[Node]:
    """Every add that belongs to the chain's sublayers."""
    return {a for s in chain for a in (s.add, *s.inner_adds)}


def _is_plain_add(n: Node) -> bool:
    if len(n.args) < 2 or n.kwargs.get("alpha", 1) != 1:
        return False
    if not all(isinstance(a, Node) and isinstance(a.meta.get("val"), torch.Tensor) for a in (n, *n.args[:2])):
        return False
    out = n.meta["val"].shape
    return same_shape(n.args[0].meta["val"].shape, out) and same_shape(n.args[1].meta["val"].shape, out)


def same_shape(a: torch.Size, b: torch.Size) -> bool:
    return len(a) == len(b) and all(_same_size(x, y) for x, y in zip(a, b))


def _same_size(a: int | torch.SymInt, b: int | torch.SymInt) -> bool:
    """Equal for every input export admits, by the symbols' ranges and relations, not by how they print (a length
    export fixed at 16 can stay a symbol in one place and be `16` in another)."""
    return a is b or statically_known_true(sym_eq(a, b))


def _same_tensor_type(n: Node, src: object) -> bool:
    if not (
        isinstance(src, Node)
        and isinstance(n.meta.get("val"), torch.Tensor)
        and isinstance(src.meta.get("val"), torch.Tensor)
    ):
        return False
    a, b = n.meta["val"], src.meta["val"]
    return a.dtype == b.dtype and same_shape(a.shape, b.shape) and a.device == b.device
