"""The examples run (at tiny sizes) and say what they claim; the compiled ones are left to their own runs."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def run_example(name: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_hand_written_example_preserves_the_function_and_trains() -> None:
    out = run_example("hand_written.py", "--steps", "3")
    assert "Block AttnRes: 16 sublayers" in out and "final:" in out
    diff = float(out.split("max relative difference ")[1].split()[0])
    assert diff < 1e-3


def test_checkpoint_conversion_continues_without_a_spike() -> None:
    out = run_example("convert_checkpoint.py", "--pretrain-steps", "30", "--steps", "3")
    assert "missing only the" in out
    line = out.split("first step after conversion: ")[1]
    converted, original = float(line.split()[0]), float(line.split(" vs ")[1].split()[0])
    assert converted == pytest.approx(original, rel=1e-3)


def test_moe_training_example_prints_both_curves() -> None:
    out = run_example("moe_training.py", "--steps", "4")
    assert "Block AttnRes: 12 sublayers" in out and "kept opaque" not in out  # grouped_mm experts: nothing opaque
    table = out.split("attnres loss")[1].strip().splitlines()[1:]  # below the header's dashes
    assert [int(row.split()[0]) for row in table] == [1, 2, 3, 4]
    assert all(float(v) > 0 for row in table for v in row.split()[1:])
