"""Shared test set-up: the device tests run on, hypothesis without deadlines, the slow-test slice."""

from __future__ import annotations

import datetime
import os
import sys
import zlib

# The tests import the INSTALLED package. `python -m pytest` puts the working directory first on
# sys.path, and from the repository root its source folders (kernels/, planner/, graphs/) would shadow
# PyPI packages of the same name: transformers >= 5.25 imports the `kernels` package.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402

import tilegraph  # noqa: E402

hypothesis_settings.register_profile("tilegraph", deadline=None, print_blob=True)
hypothesis_settings.load_profile("tilegraph")

DEVICE = "cpu" if tilegraph.SIMULATOR else "cuda"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--slow-slice",
        default=None,
        help="K/N: of the tests marked slow, run only slice K of N (K=auto: the day of the year mod N)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if tilegraph.SIMULATOR:
        skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (tilegraph runs on the simulator here)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
    spec = config.getoption("--slow-slice")
    if not spec:
        return
    k_text, n_text = spec.split("/")
    n = int(n_text)
    k = datetime.date.today().timetuple().tm_yday % n if k_text == "auto" else int(k_text)
    keep, drop = [], []
    for item in items:
        in_slice = "slow" not in item.keywords or zlib.crc32(item.nodeid.encode()) % n == k
        (keep if in_slice else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def device() -> torch.device:
    return torch.device(DEVICE)
