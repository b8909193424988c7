"""Every GPU figure of the README in one prepared run: a GPU machine is lent by the hour, so nothing is typed there.

    python -m benchmarks.gpu --out "$OUT"          # on one CUDA device, within 9 minutes

Runs, each in its own process under its own time limit (a step that overruns or fails is recorded as such and the
next one runs): the Triton kernel tests, one block's depth step against its memory-traffic bound, the medium config
(training, inference, peak memory, cold compile), compiled static-cache decoding and the suite's small size. Each
step's log and JSON land in the output folder; `gpu.json` there lists every step with its status, wall time and the
device it ran on.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

BUDGET_S = 9 * 60


def steps(out: Path) -> list[tuple[str, list[str], int]]:
    """(name, command, seconds it may take), in the order they run; the limits add up to the budget."""
    py = [sys.executable, "-m"]
    results = ["--out", str(out)]
    return [
        ("kernel_tests", [*py, "pytest", "-q", "tests/test_kernels.py"], 60),
        ("depth_step", [*py, "benchmarks.depth_step", "--device", "cuda", *results], 45),
        (
            "medium",
            [*py, "benchmarks.run", "--config", "medium", "--device", "cuda", "--no-eager", "--rounds", "5",
             "--variants", "baseline,attnres_fx,handwritten", *results],
            210,
        ),  # fmt: skip
        ("compiled_decode", [*py, "benchmarks.generate", "--compiled", "--device", "cuda", *results], 90),
        (
            "suite_small",
            [*py, "attnres_fx", "bench", "--size", "small", "--device", "cuda", "--backends", "inductor",
             "--iterations", "5", "--timeout", "60", *results],
            135,
        ),  # fmt: skip
    ]


def run_step(name: str, cmd: list[str], limit: int, out: Path) -> dict:
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        try:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=limit)
            status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timeout after {limit} s"
    return {"step": name, "command": " ".join(cmd), "status": status, "wall_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_results")
    parser.add_argument("--only", help="comma-separated step names (default: all)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks.gpu: no CUDA device here; the CPU figures come from the other benchmarks.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in steps(out) if not args.only or s[0] in args.only.split(",")]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": []}
    for name, cmd, limit in chosen:
        report["steps"].append(run_step(name, cmd, limit, out))
        print(json.dumps(report["steps"][-1]), flush=True)
        (out / "gpu.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
