import os
from pathlib import Path

import numpy as np
import pytest

import ferrum


@pytest.fixture
def rng():
    # Fresh data each run (seed printed on failure through the fixture's repr in the report).
    seed = np.random.SeedSequence().entropy % (2 ** 32)
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)


def pytest_report_header(config):
    return ["ferrum backends: " + ", ".join(
        f"{n}={'yes' if i.available else 'no (' + i.reason + ')'}"
        for n, i in ferrum.backends().items())]


#: The golden vectors: $FERRUM_GOLDEN, else shared/golden beside the checkout (as CI lays it).
GOLDEN = Path(os.environ.get("FERRUM_GOLDEN") or
              Path(__file__).resolve().parents[2] / "shared" / "golden" / "marlin_golden.npz")


@pytest.fixture(scope="session")
def golden():
    if not GOLDEN.exists():
        pytest.skip(f"golden vectors not found at {GOLDEN} (set FERRUM_GOLDEN)")
    return np.load(GOLDEN)
