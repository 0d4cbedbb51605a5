import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The engine runs on its own thread beside uvicorn and the test client:
    one intra-op thread avoids OpenMP spin-waits on a shared 2-core machine
    (two threads were ~60x slower there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
