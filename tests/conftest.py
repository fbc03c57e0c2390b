import os
from pathlib import Path

import pytest
import torch

# The tests' models are tiny: one thread avoids the threading overhead that dominates small matmuls (and
# keeps timings steady when the machine is busy). Subprocesses get the same through OMP_NUM_THREADS=1.
torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    """Every test gets its own base dir and report dir, so nothing touches ~/.cache or the repo's report/."""
    base = tmp_path / "base"
    report = tmp_path / "report"
    monkeypatch.setenv("NANOPIPE_BASE_DIR", str(base))
    monkeypatch.setenv("NANOPIPE_REPORT_DIR", str(report))
    for var in ("NANOPIPE_DEVICE", "NANOPIPE_DTYPE", "NANOPIPE_DATA", "NANOPIPE_DEBUG", "NANOPIPE_EVAL_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    return base


@pytest.fixture
def shared_data():
    """../shared/data when this checkout has it (developer machines, CI); tests that need it skip otherwise."""
    path = SHARED / "data"
    if not path.exists():
        pytest.skip("../shared/data is not present")
    return path


def subprocess_env(**extra):
    """Environment for a child python process: the test's dirs, CPU, and the repo on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update({k: str(v) for k, v in extra.items()})
    return env
