"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """One intra-op thread for each test module, restored afterwards: these small CPU forwards gain
    little from a second thread, while an OpenMP pool on an oversubscribed machine (a benchmark
    running beside the tests) runs them 10-50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
