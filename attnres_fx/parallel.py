"""Data, tensor and sequence parallelism around a transformed model: what to refuse, and what the depth parameters
need under sequence parallelism.

Depth attention is per token, so it needs no communication in the forward, also when sequence parallelism shards the
stream over tokens. Its parameters then see only their rank's tokens: `SequenceParallelDepth` makes them replicated
DTensors whose gradients are partial sums, reduced over the group like those of the norms that `SequenceParallel`
shards.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from .errors import AttnResError
from .parameters import SiteParameters


class SequenceParallelDepth(ParallelStyle):
    """The plan entry for a transformed model's `attnres` submodule under sequence parallelism:

        parallelize_module(model, tp_mesh, {**plan, "attnres": attnres_fx.SequenceParallelDepth()})

    Its parameters become replicated DTensors; each rank's depth attention reads them as local tensors whose
    gradients are partial sums over the rank's tokens, summed over the mesh when they reach the parameters.
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, _replicate)


def _replicate(name: str, module: nn.Module, mesh: DeviceMesh) -> None:
    for key, p in list(module.named_parameters(recurse=False)):
        replicated = nn.Parameter(distribute_tensor(p, mesh, [Replicate()]), requires_grad=p.requires_grad)
        module.register_parameter(key, replicated)


def site_weights(site: SiteParameters) -> tuple[Tensor, Tensor]:
    """A site's (query, key weight) as the tensors depth attention computes with."""
    return _local(site.query), _local(site.key_weight)


def _local(p: Tensor) -> Tensor:
    if not isinstance(p, DTensor):
        return p
    grads = [Partial() if isinstance(placement, Replicate) else placement for placement in p.placements]
    return p.to_local(grad_placements=grads)


def refuse_distributed(model: nn.Module) -> None:
    """DDP and FSDP register a model's parameters when they wrap it, and tensor parallelism replaces them by DTensors:
    the new `attnres` parameters would be left out, or the capture would trace collectives. Transform first."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    order = (
        "Transform the unwrapped model first, then wrap, shard or parallelize the result: "
        "`model = attnres_fx.transform(model)`, then `parallelize_module(...)`, `fully_shard(layer)` per layer and "
        "`fully_shard(model)`, or `DistributedDataParallel(model)`."
    )
    for path, module in model.named_modules():
        where = f"submodule `{path}`" if path else "the model"
        if isinstance(module, (nn.parallel.DistributedDataParallel, FullyShardedDataParallel, FSDPModule)):
            raise AttnResError(
                f"{where} is already wrapped or sharded by {type(module).__name__}, which registered its parameters "
                "before attnres_fx could add its own (the `attnres.*` pseudo-queries would be neither synchronised nor "
                f"sharded). {order}"
            )
        distributed = [n for n, p in module.named_parameters(recurse=False) if isinstance(p, DTensor)]
        if distributed:
            raise AttnResError(
                f"{where} holds DTensor parameters ({', '.join(distributed[:3])}): it was parallelized (tensor or "
                "sequence parallel, `parallelize_module`) before attnres_fx could capture it, and a capture cannot "
                f"see through the collectives. {order}"
            )
