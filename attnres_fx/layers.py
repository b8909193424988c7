"""Where the stream crosses module boundaries: the layers that hold its residual adds and the norms that read it.

Module-faithful execution (`hooks.py`) needs, for every *layer* (a module whose forward holds consecutive residual
adds, such as a decoder layer): the norm modules inside it that read the stream, the argument through which the
stream enters it and the output through which it leaves. The captured graph says which modules; one eager call of
the example says which argument and which output. When the stream does not cross module boundaries that way (a
residual add in the model's own forward, a norm computed without a module), the reason is returned and the model is
executed by replaying its rewritten graph instead.
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

from .stream import Stream, module_path


@dataclass(frozen=True)
class LayerLayout:
    """One layer: the consecutive sublayers whose residual adds its forward holds."""

    path: str
    first_site: int
    num_sites: int
    readers: tuple[tuple[str, int], ...]  # (norm module path, the sublayer whose input it reads)
    in_place: bool  # its residual adds are in place (`x += f(x)`): it must be handed a copy of the partial sum
    stream_arg: int | str = 0  # the positional index or keyword through which the stream enters
    output_index: int | None = None  # None: the forward returns the stream; i: it is element i of a tuple

    @property
    def end_site(self) -> int:
        return self.first_site + self.num_sites


ModuleCall = tuple[tuple, dict[str, Any], Any]  # (args, kwargs, output) of one call of a module


@contextlib.contextmanager
def recording_module_calls(model: nn.Module) -> Iterator[dict[str, list[ModuleCall]]]:
    """Record every submodule call of the model's last run inside the block (capture runs the forward on fake
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
    return _locate_stream_arguments(layers, calls)


def _layers_from_graph(stream: Stream) -> list[LayerLayout] | str:
    runs: list[tuple[str, list[int]]] = []
    for j, site in enumerate(stream.sites):
        owner = module_path(site.add)
        if not owner:
            return f"the residual add of sublayer {j} is in the model's own forward, not in a submodule"
        if runs and runs[-1][0] == owner:
            runs[-1][1].append(j)
        elif any(owner == o for o, _ in runs):
            return f"`{owner}` holds the residual adds of non-consecutive sublayers (one layer called twice)"
        else:
            runs.append((owner, [j]))
    layers = []
    for owner, sites in runs:
        readers = []
        for j in sites:
            outside = [p for p in stream.sites[j].readers if not p.startswith(owner + ".")]
            if outside or not stream.sites[j].readers:
                where = f"`{outside[0]}`" if outside and outside[0] else "the forward of a module"
                return (
                    f"the norm that sublayer {j} reads through is computed in {where}, not by a norm module in "
                    f"`{owner}`"
                )
            readers += [(p, j) for p in stream.sites[j].readers]
        adds = [a for j in sites for a in (stream.sites[j].add, *stream.sites[j].inner_adds)]
        in_place = any(a.target is torch.ops.aten.add_.Tensor for a in adds)
        layers.append(LayerLayout(owner, sites[0], len(sites), tuple(readers), in_place))
    return layers


def _locate_stream_arguments(
    layers: list[LayerLayout], calls: dict[str, list[ModuleCall]]
) -> tuple[LayerLayout, ...] | str:
    """Which argument carries the stream into each layer and which output carries it out, from one recorded call."""
    located, previous_output = [], None
    for layer in layers:
        if len(calls[layer.path]) != 1:
            return f"`{layer.path}` ran {len(calls[layer.path])} times in one call of the model"
        args, kwargs, output = calls[layer.path][0]
        first_reader = next(path for path, j in layer.readers if j == layer.first_site)
        reads = calls.get(first_reader)
        where = _position_of(reads[0][0][0] if reads and reads[0][0] else None, args, kwargs)
        if where is None:
            return f"`{layer.path}` does not hand its stream input unchanged to the norm of its first sublayer"
        if previous_output is not None and _get(args, kwargs, where) is not previous_output:
            return f"the stream is changed on its way into `{layer.path}`"
        index = None if isinstance(output, Tensor) else 0
        if index == 0 and not (isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor)):
            return f"`{layer.path}` returns a {type(output).__name__}, not the stream (a tensor, or a tuple led by it)"
        previous_output = output if index is None else output[0]
        located.append(dataclasses.replace(layer, stream_arg=where, output_index=index))
    return tuple(located)


def find_stream_start(layers: tuple[LayerLayout, ...], calls: dict[str, list[ModuleCall]]) -> str | None:
    """The module whose output the first layer reads as the stream (an embedding, a dropout after it), if one is
    called once per call: the state can then start on that output, outside the first layer (so that a layer compiled
    on its own sees the same inputs as the others). The last such module in call order: what it returns flows on."""
    first = layers[0]
    args, kwargs, _ = calls[first.path][0]
    x0 = _get(args, kwargs, first.stream_arg)
    found = [path for path, done in calls.items() if path and len(done) == 1 and done[0][2] is x0]
    return found[-1] if found else None


def _position_of(value: Tensor | None, args: tuple, kwargs: dict[str, Any]) -> int | str | None:
    if value is None:
        return None
    for i, a in enumerate(args):
        if a is value:
            return i
    return next((k for k, v in kwargs.items() if v is value), None)


def _get(args: tuple, kwargs: dict[str, Any], where: int | str) -> Any:
    return args[where] if isinstance(where, int) else kwargs[where]
