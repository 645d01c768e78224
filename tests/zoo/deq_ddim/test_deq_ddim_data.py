"""Loaders: the digits split and the CIFAR-10 pickles (real format, fixture files)."""
import pytest
import torch
from omegaconf import OmegaConf

from zoo.common import MissingDataError
from zoo.common.cifar import write_cifar10
from zoo.deq_ddim.data import build_datasets, inversion_targets


def test_digits_split_is_scaled_and_keeps_the_heldout_images_out():
    cfg = OmegaConf.create({"name": "digits", "heldout": 10, "split_seed": 0, "num_targets": 4, "root": None})
    splits = build_datasets(cfg)
    assert splits.train.shape == (1787, 1, 8, 8) and splits.heldout.shape == (10, 1, 8, 8)
    assert splits.train.min() == -1.0 and splits.train.max() == 1.0
    # a partition of the 1797 images: train + held-out sum to the whole set, pixel by pixel
    from sklearn.datasets import load_digits

    whole = torch.from_numpy(load_digits().images).double() / 8.0 - 1.0
    torch.testing.assert_close(splits.train.double().sum(0)[0] + splits.heldout.double().sum(0)[0], whole.sum(0))
    assert torch.equal(inversion_targets(cfg, splits, seed=3), splits.heldout[:4])
    other = build_datasets(OmegaConf.merge(cfg, {"split_seed": 1}))
    assert not torch.equal(other.heldout, splits.heldout)


def test_cifar10_pickles_give_training_targets_in_minus_one_one(tmp_path):
    written = write_cifar10(tmp_path, n_train=3, n_test=2)
    cfg = OmegaConf.create({"name": "cifar10", "root": str(tmp_path), "heldout": 0, "split_seed": 0, "num_targets": 1})
    splits = build_datasets(cfg)
    assert splits.train.shape == (15, 3, 32, 32) and splits.channels == 3
    data, _ = written["data_batch_1"]
    first = torch.from_numpy(data[0].reshape(3, 32, 32)).float() / 127.5 - 1.0
    torch.testing.assert_close(splits.train[0], first)
    t1, t1_again, t2 = (inversion_targets(cfg, splits, seed=s) for s in (1, 1, 2))
    assert torch.equal(t1, t1_again) and t1.shape == (1, 3, 32, 32)
    assert any(torch.equal(t1[0], x) for x in splits.train)


def test_missing_cifar10_names_the_layout(tmp_path):
    cfg = OmegaConf.create({"name": "cifar10", "root": str(tmp_path), "heldout": 0, "split_seed": 0, "num_targets": 1})
    with pytest.raises(MissingDataError, match=r"cifar-10-batches-py/data_batch_1(.|\n)*digits_inversion"):
        build_datasets(cfg)
