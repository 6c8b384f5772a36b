import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One OpenMP thread for modules of many tiny ops: on a shared 2-core machine two threads spend
    most of their time waiting for each other (measured 25 s vs 0.9 s for 1000 ancestral steps)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
