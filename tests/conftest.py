import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The sample data sits beside the checkout (../shared/data), in CI's clone as in a session's.
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_configure(config):
    """Threads, then torch: before any test module imports it (OpenMP reads OMP_NUM_THREADS when it loads).

    Tests run on small CPU tensors: two threads at most, and under pytest-xdist (`make test`) each worker its share
    of the cores, since more threads than cores only adds contention. The tools the tests start inherit the value.
    The xdist controller runs no test and sets nothing, or its workers would inherit its choice."""
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers is None and config.getoption("numprocesses", default=None):
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # not on macOS
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, min(2, cores // (workers or 1)))))
    import torch

    # Same inputs, same result: an op without a deterministic kernel fails here instead of making a test
    # depend on thread timing. (What still differs between machines is the arithmetic itself: vector
    # widths, BLAS paths. Tests that assert learning leave a margin for that; `make test-capabilities`
    # runs the suite under ATEN_CPU_CAPABILITY=default, avx2 (oneDNN and MKL held to AVX2 too) and avx512.)
    torch.use_deterministic_algorithms(True)


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    """The two runs' last checkpoints hold bit-identical weights (what an exact resumption promises)."""
    import torch

    a = torch.load(Path(run_a) / "checkpoints/last.pth", weights_only=True)["model"]
    b = torch.load(Path(run_b) / "checkpoints/last.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
