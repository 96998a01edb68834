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
    return [f"ferrum backends: " + ", ".join(
        f"{n}={'yes' if i.available else 'no (' + i.reason + ')'}"
        for n, i in ferrum.backends().items())]
