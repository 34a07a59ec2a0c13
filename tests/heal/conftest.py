"""Fixtures shared by the tests of :mod:`heal`."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for the whole module (tiny models: thread start-up costs more than the
    maths, and CI's 2 cores are busy), the previous count restored after it."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
