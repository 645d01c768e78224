"""MDEQ loaders against fixtures in the real on-disk formats."""
import numpy as np
import pytest
import torch
from PIL import Image

from zoo.mdeq.data import (CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, build_datasets,
                           digits_split)


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar_pickles_give_images_labels_and_normalisation(tmp_path, bytes_keys, cifar_writer):
    written = cifar_writer(tmp_path, bytes_keys=bytes_keys)
    splits = build_datasets({"name": "cifar10", "root": str(tmp_path), "augment": False})
    assert len(splits.train) == 20 and len(splits.test) == 3
    # Item 5 is the first image of data_batch_2: pixel (c, y, x) = data[c*1024 + y*32 + x].
    raw, labels = written["data_batch_2"]
    image, label = splits.train[4]
    assert image.shape == (3, 32, 32) and label == labels[0]
    planes = torch.from_numpy(raw[0].reshape(3, 32, 32).astype(np.float32) / 255.0)
    mean, std = torch.tensor(CIFAR_MEAN)[:, None, None], torch.tensor(CIFAR_STD)[:, None, None]
    torch.testing.assert_close(image, (planes - mean) / std)
    test_image, test_label = splits.test[2]
    assert test_label == written["test_batch"][1][2]


def test_cifar_augmentation_crops_and_flips_the_same_pixels(tmp_path, cifar_writer):
    cifar_writer(tmp_path)
    splits = build_datasets({"name": "cifar10", "root": str(tmp_path), "augment": True})
    torch.manual_seed(0)
    plain = build_datasets({"name": "cifar10", "root": str(tmp_path), "augment": False}).train[0][0]
    # Every augmented view is a shifted/flipped crop: its centre 24x24 block appears in the
    # (flipped or not) original shifted by at most 4 pixels.
    for _ in range(5):
        view = splits.train[0][0]
        assert view.shape == (3, 32, 32)
        centre = view[:, 4:28, 4:28]
        found = any(torch.allclose(centre, img[:, 4 + dy:28 + dy, 4 + dx:28 + dx])
                    for img in (plain, plain.flip(-1))
                    for dy in range(-4, 5) for dx in range(-4, 5))
        assert found


def test_missing_cifar_names_the_layout(tmp_path):
    # An empty root: the missing files are listed, then the layout.
    with pytest.raises(FileNotFoundError,
                       match=r"lacks 6 of 6(.|\n)*cifar-10-batches-py/data_batch_1(.|\n)*<root>/cifar-10-batches-py/"):
        build_datasets({"name": "cifar10", "root": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match=r"not a directory(.|\n)*<root>/cifar-10-batches-py/"):
        build_datasets({"name": "cifar10", "root": str(tmp_path / "nowhere")})


def test_imagenet_class_folders(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in [("train", 2), ("val", 1)]:
        for wnid in ["n01440764", "n01443537", "n01484850"]:
            (tmp_path / split / wnid).mkdir(parents=True)
            for k in range(n):
                # Smooth ramps, so that resampling differences stay small.
                yy, xx = np.mgrid[0:300, 0:260]
                phase = rng.uniform(0, 6, size=3)
                pixels = np.stack([127 + 120 * np.sin(xx / 40 + yy / 55 + p) for p in phase], -1)
                pixels = pixels.astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / wnid / f"{wnid}_{k}.JPEG")
    splits = build_datasets({"name": "imagenet", "root": str(tmp_path)})
    assert len(splits.train) == 6 and len(splits.test) == 3 and splits.num_classes == 1000
    image, label = splits.test[2]
    assert image.shape == (3, 224, 224) and label == 2  # classes sorted by wnid
    train_image, train_label = splits.train[3]
    assert train_image.shape == (3, 224, 224) and train_label == 1
    # Validation: resize the short side to 256, centre crop 224, normalise.
    original = Image.open(tmp_path / "val" / "n01484850" / "n01484850_0.JPEG").convert("RGB")
    resized = np.asarray(original.resize((256, round(300 * 256 / 260)), Image.BILINEAR),
                         dtype=np.float32) / 255.0
    top, left = (resized.shape[0] - 224) // 2, (resized.shape[1] - 224) // 2
    expected = (resized[top:top + 224, left:left + 224] - IMAGENET_MEAN) / IMAGENET_STD
    err = (image.permute(1, 2, 0).numpy() - expected)
    assert np.abs(err).mean() < 0.06  # ~1-3 grey levels: resampling rounding only


def test_missing_imagenet_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"<root>/train/<wnid>"):
        build_datasets({"name": "imagenet", "root": str(tmp_path)})


def test_digits_split_is_stratified_fixed_and_standardised():
    train, test = digits_split(seed=1)
    assert len(train) == 1437 and len(test) == 360
    x_train, y_train = train.images, train.labels
    assert x_train.shape == (1437, 1, 8, 8)
    assert abs(float(x_train.mean())) < 1e-4 and abs(float(x_train.std()) - 1) < 1e-3
    counts = torch.bincount(test.labels, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # ~20% of each class
    again, _ = digits_split(seed=1)
    other, _ = digits_split(seed=2)
    assert torch.equal(again.labels, y_train)
    assert not torch.equal(other.labels, y_train)


def test_digits_shift_moves_the_image_by_at_most_one_pixel():
    train, _ = digits_split(seed=0, max_shift=1)
    torch.manual_seed(0)
    plain, background = train.images[3], float(train.images.min())
    seen = set()
    for _ in range(40):
        view, label = train[3]
        assert label == train.labels[3]
        padded = torch.nn.functional.pad(plain, (1, 1, 1, 1), value=background)
        offsets = [(dy, dx) for dy in range(3) for dx in range(3)
                   if torch.equal(view, padded[:, dy:dy + 8, dx:dx + 8])]
        assert offsets
        seen.update(offsets)
    assert len(seen) >= 5  # the shifts are random
