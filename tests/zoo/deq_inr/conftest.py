"""Fixtures of the DEQ-INR tests: one intra-op thread (tiny tensors, a busy machine)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_cpu_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
