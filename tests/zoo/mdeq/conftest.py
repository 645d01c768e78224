"""Fixtures of the MDEQ tests: CIFAR-10 in its real on-disk format."""
import pickle

import numpy as np
import pytest


def write_cifar(root, n_train=4, n_test=3, bytes_keys=False, seed=0):
    """Writes ``root/cifar-10-batches-py/`` as the CIFAR-10 python pickles: dicts whose
    ``data`` is uint8 (N, 3072) made of the R, G, B planes, plus ``labels``; returns
    {file name: (data, labels)}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    written = {}
    for name, n in [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({key("batch_label"): name, key("data"): data, key("labels"): labels,
                         key("filenames"): [f"{i}.png" for i in range(n)]}, fh)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}, fh)
    return written


@pytest.fixture
def cifar_writer():
    return write_cifar


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """These models run on tiny tensors: one intra-op thread is as fast on an idle machine
    and far faster on a busy one (threads waiting on each other)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
