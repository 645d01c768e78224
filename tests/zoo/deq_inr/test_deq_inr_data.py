"""DEQ-INR data: coordinate grids, PSNR, and every loader on a fixture in its real format."""
import math

import numpy as np
import pytest
import torch

from zoo.common import MissingDataError
from zoo.deq_inr.data import (build_datasets, coordinate_grid, grid_signal, input_scale, psnr, read_wav,
                              synthetic_audio, write_wav)


def test_coordinate_grid_by_hand():
    grid = coordinate_grid((2, 3))
    expected = torch.tensor([[-1, -1], [-1, 0], [-1, 1], [1, -1], [1, 0], [1, 1]], dtype=torch.float32)
    assert torch.equal(grid, expected)
    assert torch.allclose(coordinate_grid((5,))[:, 0], torch.tensor([-1, -0.5, 0, 0.5, 1]))


def test_psnr_by_hand():
    # values live in [-1, 1]: 0 -> 0.5 and 1 -> 1.0, so the MSE is 0.25 and PSNR 10 log10(4)
    assert float(psnr(torch.zeros(4), torch.ones(4))) == pytest.approx(10 * math.log10(4), abs=1e-5)
    # the prediction is clamped to [0, 1] first: 3 -> 1 is exact
    assert float(psnr(torch.full((4,), 3.0), torch.ones(4))) > 100
    # error 0.1 on one of four [0, 1] values: MSE 0.0025 -> 26.02 dB
    target = torch.tensor([-1.0, 0.0, 0.5, 1.0])
    pred = target.clone()
    pred[1] += 0.2  # 0.1 in [0, 1] units
    assert float(psnr(pred, target)) == pytest.approx(-10 * math.log10(0.01 / 4), abs=1e-4)
    per_row = psnr(torch.zeros(2, 3), torch.stack([torch.zeros(3), torch.ones(3)]), dims=(1,))
    assert per_row[1] == pytest.approx(10 * math.log10(4), abs=1e-5) and per_row[0] > 100


def test_generalization_protocol_even_and_odd_pixels():
    image = np.arange(16, dtype=np.float32).reshape(4, 4, 1) / 15
    s = grid_signal("image", "ramp", image, protocol="generalization")
    assert s.train_shape == (2, 2, 1) and s.test_shape == (2, 2, 1) and s.resolution == 4
    axis = torch.linspace(-1, 1, 4)
    assert torch.allclose(s.train_coords[1], torch.stack([axis[0], axis[2]]))
    assert torch.allclose(s.test_coords[0], torch.stack([axis[1], axis[1]]))
    # training pixel (0, 2) is 2/15, test pixel (1, 1) is 5/15, both mapped to [-1, 1]
    assert s.train_values[1, 0] == pytest.approx(2 / 15 * 2 - 1)
    assert s.test_values[0, 0] == pytest.approx(5 / 15 * 2 - 1)


def _ramp_rgb(n=8, h=8, w=8):
    return (np.arange(n * h * w * 3) % 251).astype(np.uint8).reshape(n, h, w, 3)


def test_div2k_and_text_npz_fixtures(tmp_path):
    (tmp_path / "image").mkdir()
    images = _ramp_rgb(3)
    np.savez(tmp_path / "image" / "data_div2k.npz", train_data=images[:1], test_data=images)
    np.savez(tmp_path / "image" / "data_2d_text.npz", train_data=images[:1], test_data=images[::-1])
    s = build_datasets({"image": "div2k", "root": str(tmp_path), "index": 2, "size": None, "protocol": "full"})
    assert s.train_shape == (8, 8, 3)
    assert torch.allclose(s.train_values, torch.from_numpy(images[2].reshape(-1, 3) / 255.0).float() * 2 - 1)
    t = build_datasets({"image": "text2d", "root": str(tmp_path), "index": 0, "size": 4,
                        "protocol": "generalization"})
    assert t.train_shape == (2, 2, 3) and t.resolution == 4
    with pytest.raises(ValueError, match="data.index=5"):
        build_datasets({"image": "div2k", "root": str(tmp_path), "index": 5, "size": None})


def test_celeba_npy_fixture_and_missing_root(tmp_path):
    (tmp_path / "image").mkdir()
    np.save(tmp_path / "image" / "celeba_128_tiny.npy", _ramp_rgb(2, 16, 16))
    s = build_datasets({"image": "celeba", "root": str(tmp_path), "index": 1, "size": 8, "grey": True})
    assert s.train_shape == (8, 8, 1) and s.out_features == 1
    with pytest.raises(MissingDataError, match="data_div2k.npz"):
        build_datasets({"image": "div2k", "root": str(tmp_path)})
    with pytest.raises(MissingDataError, match="data.root is not set"):
        build_datasets({"image": "celeba", "root": None})


def test_image_file_and_packaged_images(tmp_path):
    import imageio.v3 as iio

    image = _ramp_rgb(1, 6, 10)[0]
    iio.imwrite(tmp_path / "img.png", image)
    s = build_datasets({"image": str(tmp_path / "img.png"), "size": None})
    # centre crop of 6x10 -> columns 2..7
    assert s.train_shape == (6, 6, 3)
    assert torch.allclose(s.train_values, torch.from_numpy(image[:, 2:8].reshape(-1, 3) / 255.0).float() * 2 - 1)
    camera = build_datasets({"image": "camera", "size": 32})
    assert camera.train_shape == (32, 32, 1) and camera.in_features == 2
    china = build_datasets({"image": "china.jpg", "size": 16, "protocol": "generalization"})
    assert china.train_shape == (8, 8, 3) and china.test_shape == (8, 8, 3)
    with pytest.raises(MissingDataError, match="neither an image file"):
        build_datasets({"image": "brain"})  # skimage sample that needs a download


def test_input_scale_follows_the_resolution():
    camera = build_datasets({"image": "camera", "size": 64, "protocol": "generalization"})
    assert input_scale({"input_scale": 256.0, "scale_resolution": 512}, camera) == 32.0
    assert input_scale({"input_scale": 25000.0, "scale_resolution": None}, camera) == 25000.0


def test_gif_fixture_and_skimage_gif(tmp_path):
    import imageio.v3 as iio

    frames = _ramp_rgb(3, 4, 5)
    iio.imwrite(tmp_path / "clip.gif", frames, loop=0)
    s = build_datasets({"kind": "video", "video": str(tmp_path / "clip.gif")})
    assert s.train_shape == (3, 4, 5, 3) and s.in_features == 3
    read = iio.imread(tmp_path / "clip.gif", index=None)
    assert torch.allclose(s.train_values, torch.from_numpy(read[..., :3].reshape(-1, 3) / 255.0).float() * 2 - 1)
    tiny = build_datasets({"kind": "video", "video": "skimage_gif", "max_frames": 4})
    assert tiny.train_shape == (4, 25, 14, 3)
    rel = build_datasets({"kind": "video", "video": "clip.gif", "root": str(tmp_path)})
    assert rel.train_shape == (3, 4, 5, 3)


def test_wav_fixture_peak_normalised_mono(tmp_path):
    from scipy.io import wavfile

    stereo = np.stack([np.array([0, 1000, -2000, 500]), np.array([0, 1000, -2000, 1500])], 1).astype(np.int16)
    wavfile.write(tmp_path / "a.wav", 8000, stereo)
    wave, rate = read_wav(tmp_path / "a.wav")
    assert rate == 8000
    np.testing.assert_allclose(wave, [0, 0.5, -1.0, 0.5], atol=1e-6)  # mono mean, then / peak
    s = build_datasets({"kind": "audio", "audio": str(tmp_path / "a.wav")})
    assert s.train_shape == (4, 1) and s.sample_rate == 8000
    assert torch.allclose(s.train_coords[:, 0], torch.linspace(-1, 1, 4))


def test_synthetic_audio_goes_through_the_wav_loader(tmp_path):
    s = build_datasets({"kind": "audio", "audio": "synthetic", "seconds": 0.5, "sample_rate": 8000}, tmp_path)
    assert (tmp_path / "synthetic.wav").is_file()
    assert s.train_shape == (4000, 1) and float(s.train_values.abs().max()) == pytest.approx(1.0)
    direct = synthetic_audio(0.5, 8000)
    assert torch.allclose(s.train_values[:, 0], torch.from_numpy(direct / np.abs(direct).max()), atol=1e-4)
    write_wav(tmp_path / "b.wav", direct, 8000)
    assert read_wav(tmp_path / "b.wav")[0].shape == (4000,)
