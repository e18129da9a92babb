"""`python -m masknorm.demo`, the README's main job, runs and shows what it claims."""

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs the demo in a child process


def test_demo_runs_and_shows_the_padding_drift():
    proc = subprocess.run(
        [sys.executable, "-m", "masknorm.demo", "--batches", "50"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    # the seeds' worked examples
    assert "MaskedLayerNorm(2)(X)   = [[-1.0, 1.0], [-1.0, 1.0]]" in out
    assert "MaskedBatchNorm1d(2)(X) = [[-1.0, -1.0], [1.0, 1.0]]" in out
    assert "[-1.34, -0.45, 0.45, 1.34]" in out
    # plain BatchNorm's running mean drifts with padding; masknorm's does not
    m = re.search(r"largest running-mean error: BatchNorm1d ([\d.]+), masknorm ([\d.]+)", out)
    assert m, out
    plain, masked = float(m.group(1)), float(m.group(2))
    assert plain > 1.0 and masked < 0.2, (plain, masked)
