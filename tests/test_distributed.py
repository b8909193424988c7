"""FSDP2 on the transformed model: every decoder layer and then the root sharded, 2 processes on gloo, eager and
compiled; loss and every gradient equal one process's on the whole batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zoo

import attnres_fx

HERE = Path(__file__).parent


@pytest.mark.parametrize("mode", ["eager", pytest.param("compiled", marks=pytest.mark.compile)])
def test_fsdp2_per_layer_matches_one_process(mode: str, tmp_path: Path) -> None:
    import fsdp_worker

    out = tmp_path / "rank0.pt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(HERE / "fsdp_worker.py"),
        str(out),
        mode,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = torch.load(out)

    model = fsdp_worker.build()
    ids = fsdp_worker.batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert zoo.rel_err(sharded["loss"], loss) < 1e-5
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sharded["grads"].keys() == expected.keys() and "attnres.site_1.query" in expected
    for name, grad in expected.items():
        assert zoo.rel_err(sharded["grads"][name], grad) < 1e-5, name


def test_a_model_sharded_before_transform_is_refused_with_what_to_do() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        model = zoo.llama()
        for layer in model.model.layers:
            fully_shard(layer, mesh=init_device_mesh("cpu", (1,)))
        with pytest.raises(
            attnres_fx.AttnResError,
            match=r"submodule `model.layers.0` is already wrapped or sharded .* "
            r"Transform the unwrapped model first",
        ):
            attnres_fx.transform(model)
    finally:
        dist.destroy_process_group()
