import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """The nets in the training tests are tiny: one thread is faster, and on a shared CPU much faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
