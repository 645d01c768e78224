"""Shared setup of the zoo tests: one intra-op thread.

The zoo tests run small models on tiny tensors: one thread is as fast on an idle machine
and far faster on a busy one (threads waiting on each other), and a test that needs more
sets them itself.
"""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_cpu_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
