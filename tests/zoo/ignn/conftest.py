"""Fixtures of the IGNN tests: a PPI raw folder in ppi.zip's formats (tests/zoo/conftest.py sets one CPU thread)."""
import pytest


@pytest.fixture
def ppi_root(tmp_path):
    """``<tmp>/PPI/raw/{train,valid,test}_*``: 2 / 1 / 1 graphs of 12 nodes."""
    from zoo.ignn.data import write_ppi_raw

    return write_ppi_raw(tmp_path / "PPI", graphs=(2, 1, 1), nodes=12)
