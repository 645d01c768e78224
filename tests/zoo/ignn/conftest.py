"""Fixtures of the IGNN tests: a PPI raw folder in ppi.zip's formats, one CPU thread."""
import pytest


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Tiny graphs: one intra-op thread is as fast on an idle machine and far faster on a
    busy one."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def ppi_root(tmp_path):
    """``<tmp>/PPI/raw/{train,valid,test}_*``: 2 / 1 / 1 graphs of 12 nodes."""
    from zoo.ignn.data import write_ppi_raw

    return write_ppi_raw(tmp_path / "PPI", graphs=(2, 1, 1), nodes=12)
