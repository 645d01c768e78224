"""CIFAR-10 in its real on-disk format (the python pickles), for every project that reads it.

Nothing is downloaded: the files are read from ``<root>/cifar-10-batches-py/`` with
`pickle`, so fixture files work without torchvision's MD5 check. `write_cifar10` writes a
small tree in exactly that format for tests.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np

from zoo.common.data import require_files

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILES = ("test_batch",)
CIFAR_LAYOUT = (
    "the CIFAR-10 python version under data.root:\n"
    "  <root>/cifar-10-batches-py/data_batch_1 ... data_batch_5, test_batch, batches.meta\n"
    "(pickled dicts with b'data' uint8 (N, 3072) and b'labels'; the archive "
    "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html unpacks to it)")


def read_cifar10(root: str | Path | None, train: bool, hint: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) uint8 and labels (N,) int64 of the train or test split.

    A missing file is a `MissingDataError` naming the layout; `hint` is appended to it
    (e.g. the project's offline experiment).
    """
    names = CIFAR_TRAIN_FILES if train else CIFAR_TEST_FILES
    layout = CIFAR_LAYOUT + (f". {hint}" if hint else "")
    folder = require_files(root, [f"{CIFAR_DIR}/{n}" for n in names + ("batches.meta",)],
                           layout=layout) / CIFAR_DIR
    images, labels = [], []
    for name in names:
        with open(os.path.join(folder, name), "rb") as fh:
            batch = pickle.load(fh, encoding="latin1")
        # The published (Python 2) pickles give str keys under latin1; files written by
        # Python 3 with bytes keys (b'data') are accepted too.
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    return np.concatenate(images).transpose(0, 2, 3, 1).copy(), np.concatenate(labels)


def write_cifar10(root: str | Path, n_train: int = 4, n_test: int = 3, bytes_keys: bool = False,
                  seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Writes ``root/cifar-10-batches-py/`` as the CIFAR-10 python pickles (for tests).

    Each batch is a dict whose ``data`` is uint8 (N, 3072) made of the R, G, B planes, plus
    ``labels``; returns {file name: (data, labels)}.
    """
    folder = Path(root) / CIFAR_DIR
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    written = {}
    for name, n in [(f, n_train) for f in CIFAR_TRAIN_FILES] + [(f, n_test) for f in CIFAR_TEST_FILES]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({key("batch_label"): name, key("data"): data, key("labels"): labels,
                         key("filenames"): [f"{i}.png" for i in range(n)]}, fh)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_vis": 3072}, fh)
    return written
