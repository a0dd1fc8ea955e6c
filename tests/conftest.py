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


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT
