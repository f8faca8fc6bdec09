"Fixtures shared by several test modules."
import pytest, torch


@pytest.fixture
def one_thread():
    "Tiny models run fastest on one thread, and the CI machine is shared: run a test on one thread, then restore."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
