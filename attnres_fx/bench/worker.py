"""One entry of the suite (a model, as original or transformed, on one backend), measured in this process.

Run by the suite in a fresh process per entry (`main()`, the entry as JSON in argv[1]), so that the
compile is cold, a crash or hang costs one row, and peak memory is this entry's alone. Prints one result line.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .accuracy import accurate, mismatch
from .models import MODELS, SIZES, main_output

RESULT_PREFIX = "attnres-bench-result "
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@dataclass(frozen=True)
class Entry:
    """What one worker measures."""

    model: str
    variant: str  # "original" or "attnres"
    backend: str
    mode: str  # "training" or "inference"
    device: str
    dtype: str
    size: str
    iterations: int
    threads: int


def compiler(backend: str) -> Callable[[nn.Module], nn.Module]:
    """`torch.compile` for a backend name of the suite, or a backend function given as `package.module:function`."""
    if ":" in backend:
        module, _, name = backend.partition(":")
        return lambda m: torch.compile(m, backend=getattr(importlib.import_module(module), name))
    if backend == "inductor-max-autotune":
        return lambda m: torch.compile(m, backend="inductor", mode="max-autotune")
    return lambda m: torch.compile(m, backend=backend)


def load(entry: Entry) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """The entry's model and inputs, seeded, in its dtype. Transformed for "attnres" (in fp32, then cast), with
    pseudo-queries drawn at std d^-1/2: logits of unit scale, depth weights clearly non-uniform."""
    import attnres_fx

    spec, size, dtype = MODELS[entry.model], SIZES[entry.size], getattr(torch, entry.dtype)
    torch.manual_seed(0)
    model = spec.build(size).to(entry.device)
    inputs = tuple(x.to(entry.device) for x in spec.inputs(size, torch.Generator().manual_seed(1)))
    if entry.variant == "attnres":
        model = attnres_fx.transform(model, inputs)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("query"):
                    p.normal_(std=p.shape[-1] ** -0.5)
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    return model.to(dtype).train(entry.mode == "training"), inputs


def step(call: Callable, model: nn.Module, inputs: tuple[Tensor, ...], training: bool) -> list[Tensor]:
    """One forward (and backward when training); returns the main output and the parameters' gradients."""
    if not training:
        with torch.no_grad():
            return [main_output(call(*inputs))]
    model.zero_grad(set_to_none=True)
    out = main_output(call(*inputs))
    (out.float().sum() / out.numel()).backward()  # the harness's reduce_to_scalar_loss
    return [out.detach(), *(p.grad for p in model.parameters() if p.grad is not None)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: str, iterations: int) -> float:
    times = []
    for _ in range(iterations):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_gb(fn: Callable[[], object], device: str) -> float | None:
    """Memory one call adds at its peak: the CUDA allocator's peak; on Linux CPUs the resident set's high-water mark,
    after handing freed memory back to the OS and with large allocations mapped fresh (glibc's default threshold,
    fixed: otherwise it grows and freed buffers are reused unseen). Changes the allocator: measure after timing."""
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2**30
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        base = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - base) / 2**20
    except OSError:  # not glibc on Linux
        return None


def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def measure(entry: Entry) -> dict:
    """The entry's row: accuracy, latencies, memory and Dynamo's counters, or the stage that failed and why."""
    row: dict = {**asdict(entry), "accuracy": None, "error": ""}
    stage = "model_fail_to_load"
    try:
        model, inputs = load(entry)

        def run(call: Callable) -> list[Tensor]:
            return step(call, model, inputs, entry.mode == "training")

        stage = "eager_fail_to_run"
        reference = [t.clone() for t in run(model)]
        row["eager_latency"] = median_seconds(lambda: run(model), entry.device, entry.iterations)
        stage = "fail_to_run"
        row.update(measure_compiled(entry, model, run, reference))
    except Exception as exc:  # a failing model or backend is a row of the report, not the end of the run
        row["accuracy"] = stage
        row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        traceback.print_exc()
    return row


def measure_compiled(entry: Entry, model: nn.Module, run: Callable, reference: list[Tensor]) -> dict:
    """Compile (cold, timed with the first step), check against eager, time; then both peaks (they change the
    allocator, so they come last) and Dynamo's counters."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = compiler(entry.backend)(model)
    start = time.perf_counter()
    result = run(compiled)
    sync(entry.device)
    compilation_latency = time.perf_counter() - start
    return {
        "accuracy": "pass"
        if accurate(result, reference, lambda: fp64_reference(entry), entry.dtype)
        else "fail_accuracy",
        "mismatch": mismatch(result, reference),
        "compilation_latency": compilation_latency,
        "latency": median_seconds(lambda: run(compiled), entry.device, entry.iterations),
        "eager_peak_mem": peak_memory_gb(lambda: run(model), entry.device),
        "dynamo_peak_mem": peak_memory_gb(lambda: run(compiled), entry.device),
        "calls_captured": counters["stats"]["calls_captured"],
        "unique_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def fp64_reference(entry: Entry) -> list[Tensor]:
    """The eager step in float64 from the same values (the entry's dtype, upcast), for the accuracy rule."""
    model, inputs = load(entry)
    model, inputs = model.double(), tuple(x.double() if x.is_floating_point() else x for x in inputs)
    return step(model, model, inputs, entry.mode == "training")


def check_vector_isa(device: str) -> None:
    """Inductor's check of the CPU's vector instructions, done before anything is timed: it builds test programs (about
    9 s in an empty cache folder, then kept on disk), a cost of the machine, not of a model. On CPU attnres_fx's
    transform builds a C++ kernel and so would pay it outside the timed compile, flattering the transformed model."""
    if device == "cpu":
        from torch._inductor.cpu_vec_isa import pick_vec_isa

        pick_vec_isa()


def main() -> None:
    entry = Entry(**json.loads(sys.argv[1]))
    if entry.device == "cpu":
        torch.set_num_threads(entry.threads)  # before compiling: Inductor bakes the count into its kernels
    check_vector_isa(entry.device)
    print(RESULT_PREFIX + json.dumps(measure(entry)), flush=True)
