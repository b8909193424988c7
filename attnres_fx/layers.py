"""Find the layers: where the stream crosses module boundaries, so that hooks on the model's own modules can make it
AttnRes.

A *layer* is one call of the innermost module whose forward holds a sublayer's residual add and, through its
submodules or itself, the norms that read the sublayer's input: a decoder layer; an `AttentionLayers` whose forward
loops over norm, branch and residual modules; the model itself, where its own forward holds the adds. Consecutive
sublayers in one call form one layer; a module called at several depths (a shared layer) is one layer per call.

For each layer: the norms that read the stream inside it (a submodule that computes a norm gets a pre-hook; a norm
that the layer's forward computes itself is `functional`, and that forward is rewritten one level deep, see
`passes/functional_norms.py`), the argument through which the stream enters it (None where the stream starts inside
the first layer) and the output through which it leaves. The captured graph says which modules and calls; the
calls recorded while capturing say which argument and which output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import Node

from .stream import Site, Stream, module_calls, same_shape

ModuleCall = tuple[tuple, dict[str, Any], Any]  # (args, kwargs, output) of one call of a module
CallId = tuple[str, int]  # (module path, which call of it in one forward)


@dataclass(frozen=True)
class Reader:
    """A norm that reads the stream inside a layer."""

    path: str  # the module the norm's input is handed to: a norm, or the layer itself (`functional`)
    call: int  # which call of that module
    offset: int  # the sublayer whose input it reads, from the layer's first; num_sites: the final aggregation
    functional: bool  # computed by the layer's own forward, not by a submodule


@dataclass(frozen=True)
class LayerLayout:
    """One layer: one call of a module whose forward holds the residual adds of consecutive sublayers."""

    path: str
    call: int
    first_site: int
    num_sites: int
    readers: tuple[Reader, ...]
    in_place: bool  # its residual adds are in place (`x += f(x)`): it must be handed a copy of the partial sum
    add_offsets: tuple[int | None, ...]  # per residual add in order: the offset of the value it makes (None: the
    # inner add of a parallel sublayer `(h + a) + m`)
    stream_arg: int | str | None = 0  # the positional index or keyword the stream enters by; None: starts inside
    output_index: int | None = None  # None: the forward returns the stream; i: it is element i of a tuple
    returns_stream: bool = True  # False: the final norm reads the stream inside this (last) layer

    @property
    def end_site(self) -> int:
        return self.first_site + self.num_sites


@contextlib.contextmanager
def recording_module_calls(model: nn.Module) -> Iterator[dict[str, list[ModuleCall]]]:
    """Record every module call of the model's last run inside the block (capture runs the forward on fake
    tensors, so this costs no extra forward and works on the meta device)."""
    calls: dict[str, list[ModuleCall]] = defaultdict(list)
    handles = [model.register_forward_pre_hook(lambda module, args: calls.clear())]
    for path, module in model.named_modules():
        handles.append(module.register_forward_hook(functools.partial(_record_call, path, calls), with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _record_call(
    path: str, calls: dict[str, list[ModuleCall]], module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any
) -> None:
    calls[path].append((args, kwargs, output))


def find_layers(stream: Stream, calls: dict[str, list[ModuleCall]]) -> tuple[LayerLayout, ...] | str:
    """The stream's layers in order, or why module hooks cannot follow the stream in this model."""
    layers = _layers_from_graph(stream)
    if isinstance(layers, str):
        return layers
    return _locate_stream_arguments(layers, calls, stream)


def _layers_from_graph(stream: Stream) -> list[LayerLayout] | str:
    runs: list[tuple[CallId, list[int]]] = []
    for j, site in enumerate(stream.sites):
        call = innermost_common_call([site.add, *site.inner_adds, *site.readers])
        if runs and runs[-1][0] == call:
            runs[-1][1].append(j)
        elif any(call == c for c, _ in runs):
            return f"one call of `{call[0] or 'the model'}` holds the residual adds of non-consecutive sublayers"
        else:
            runs.append((call, [j]))
    layers = []
    for k, (call, sites) in enumerate(runs):
        readers = [r for j in sites for r in _readers(stream.sites[j].readers, call, j - sites[0])]
        inside = [r for r in stream.final_readers if call in module_calls(r)] if k == len(runs) - 1 else []
        if inside and len(inside) != len(stream.final_readers):
            return f"the stream's end is normalised both inside and after `{call[0] or 'the model'}`"
        readers += _readers(inside, call, len(sites))
        adds = [a for j in sites for a in (*stream.sites[j].inner_adds, stream.sites[j].add)]
        in_place = any(a.target is torch.ops.aten.add_.Tensor for a in adds)
        offsets = tuple(o for i, j in enumerate(sites) for o in _add_offsets(stream.sites[j], i))
        layout = LayerLayout(call[0], call[1], sites[0], len(sites), tuple(readers), in_place, offsets)
        layers.append(dataclasses.replace(layout, returns_stream=not inside))
    return layers


def _readers(nodes: tuple[Node, ...] | list[Node], layer: CallId, offset: int) -> list[Reader]:
    found: dict[Reader, None] = {}
    for node in nodes:
        path, call = module_calls(node)[-1] if module_calls(node) else ("", 0)
        found[Reader(path, call, offset, functional=(path, call) == layer)] = None
    return list(found)


def _add_offsets(site: Site, index: int) -> list[int | None]:
    return [None] * len(site.inner_adds) + [index + 1]


def innermost_common_call(nodes: list[Node]) -> CallId:
    """The innermost module call that recorded every one of `nodes`."""
    stacks = [module_calls(n) or [("", 0)] for n in nodes]
    common = ("", 0)
    for level in zip(*stacks):
        if any(c != level[0] for c in level):
            break
        common = level[0]
    return common


def _locate_stream_arguments(
    layers: list[LayerLayout], calls: dict[str, list[ModuleCall]], stream: Stream
) -> tuple[LayerLayout, ...] | str:
    """Which argument carries the stream into each layer and which output carries it out, from the recorded calls."""
    located: list[LayerLayout] = []
    previous_output: Tensor | None = None
    for k, layer in enumerate(layers):
        if len(calls.get(layer.path, ())) <= layer.call:
            return f"`{layer.path}` was not seen running when the model was captured"
        args, kwargs, output = calls[layer.path][layer.call]
        read = _first_read(layer, calls, args, kwargs, stream)
        entered = previous_output if k else read
        where = _position_of(entered, args, kwargs)
        if k and (where is None or (read is not None and read is not entered)):
            first = layer.first_site
            return f"the stream is changed on its way into `{layer.path}` (before the norm of sublayer {first})"
        if not k and where is None:  # the stream starts inside the first layer
            if read is None:
                return (
                    f"the stream starts inside `{layer.path or 'the model'}`, whose own forward computes the norm that "
                    "reads it first (a functional norm)"
                )
            where = None
        last = k == len(layers) - 1
        index = None if isinstance(output, Tensor) else 0
        if (not last or layer.returns_stream) and index == 0 and not _led_by_tensor(output):
            return f"`{layer.path}` returns a {type(output).__name__}, not the stream (a tensor, or a tuple led by it)"
        previous_output = output if index is None else output[0]
        located.append(dataclasses.replace(layer, stream_arg=where, output_index=index))
    return tuple(located)


def _first_read(
    layer: LayerLayout, calls: dict[str, list[ModuleCall]], args: tuple, kwargs: dict[str, Any], stream: Stream
) -> Tensor | None:
    """The value the norm of the layer's first sublayer is handed (None for a functional norm: then the layer's only
    tensor argument of the stream's shape, if it has one)."""
    reader = next(r for r in layer.readers if r.offset == 0)
    if not reader.functional:
        recorded = calls.get(reader.path, ())
        return recorded[reader.call][0][0] if len(recorded) > reader.call and recorded[reader.call][0] else None
    shape = stream.start.meta["val"].shape
    candidates = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and same_shape(a.shape, shape)]
    return candidates[0] if len(candidates) == 1 else None


def find_stream_start(layers: tuple[LayerLayout, ...], calls: dict[str, list[ModuleCall]]) -> str | None:
    """The module whose output the first layer reads as the stream (an embedding, a dropout after it), if one is
    called once per call: the state can then start on that output, outside the first layer (so that a layer compiled
    on its own sees the same inputs as the others). The last such module in call order: what it returns flows on."""
    first = layers[0]
    if first.stream_arg is None:
        return None
    args, kwargs, _ = calls[first.path][first.call]
    x0 = _get(args, kwargs, first.stream_arg)
    found = [path for path, done in calls.items() if path and len(done) == 1 and done[0][2] is x0]
    return found[-1] if found else None


def _led_by_tensor(output: Any) -> bool:
    return isinstance(output, (tuple, list)) and bool(output) and isinstance(output[0], Tensor)


def _position_of(value: Tensor | None, args: tuple, kwargs: dict[str, Any]) -> int | str | None:
    if value is None:
        return None
    for i, a in enumerate(args):
        if a is value:
            return i
    return next((k for k, v in kwargs.items() if v is value), None)


def _get(args: tuple, kwargs: dict[str, Any], where: int | str) -> Any:
    return args[where] if isinstance(where, int) else kwargs[where]
