import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The sample data sits beside the checkout (../shared/data), in CI's clone as in a session's.
SHARED_DATA = ROOT.parent / "shared" / "data"

# Tests run on small CPU tensors; more threads than cores only adds contention.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

# Same inputs, same result: an op without a deterministic kernel fails here instead of making a test
# depend on thread timing. (What still differs between machines is the arithmetic itself: vector
# widths, BLAS paths. Tests that assert learning leave a margin for that; `make test-capabilities`
# runs the suite under ATEN_CPU_CAPABILITY=default, avx2 (oneDNN and MKL held to AVX2 too) and avx512.)
torch.use_deterministic_algorithms(True)


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    """The two runs' last checkpoints hold bit-identical weights (what an exact resumption promises)."""
    a = torch.load(Path(run_a) / "checkpoints/last.pth", weights_only=True)["model"]
    b = torch.load(Path(run_b) / "checkpoints/last.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0, msg=key)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
