import os
import sys

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels' tests run them on CPU tensors; read when triton.jit decorates
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Past the recompile limit Dynamo would silently run eagerly and a compiled-vs-eager test would pass without
# compiling. Make that an error, and start each compile test from an empty cache.
torch._dynamo.config.fail_on_recompile_limit_hit = True


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_dynamo(request):
    if request.node.get_closest_marker("compile"):
        torch._dynamo.reset()


def pytest_terminal_summary(terminalreporter) -> None:
    """How the generated models of the property tests went (transformed which way, or refused)."""
    properties = sys.modules.get("test_properties")
    if properties is not None and properties.OUTCOMES:
        counts = ", ".join(f"{n} {what}" for what, n in sorted(properties.OUTCOMES.items()))
        terminalreporter.write_line(f"property tests, {sum(properties.OUTCOMES.values())} generated models: {counts}")
