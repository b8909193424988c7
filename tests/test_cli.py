"""`attnres-fx inspect` prints the plan for HF types, factories, and on the meta device."""

import pytest

from attnres_fx.cli import main


def test_inspect_hf_model_type_on_the_meta_device(capsys) -> None:
    main(["inspect", "--hf", "qwen3", "--meta", "--num-blocks", "4"])
    out = capsys.readouterr().out
    assert "8 sublayers, block_size 2, 4 blocks" in out
    assert "model.layers.3.mlp" in out and "attnres.final.query" in out and "meta device" in out


def test_inspect_user_factory_and_refusal(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["inspect", "--factory", "zoo:NoResidual", "--input-shape", "2,32"])
    assert info.value.code == 2
    assert "found no residual add" in capsys.readouterr().err


def test_inspect_factory_model(capsys) -> None:
    main(["inspect", "--factory", "zoo:Residual3D", "--input-shape", "2,5,32"])
    out = capsys.readouterr().out
    assert "2 sublayers" in out and "layers.1" in out
