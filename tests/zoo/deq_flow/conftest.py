"""Fixtures of the DEQ-Flow tests: flow files and dataset trees in their real on-disk formats
(Middlebury .flo, PFM, KITTI 16-bit PNG; torchvision's and RAFT's folder layouts), and state
dicts with the upstream DEQ-Flow key names."""
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image



# --------------------------------------------------------------------------- file formats
def write_flo(path, flow):
    """Middlebury .flo: b'PIEH', int32 w, int32 h (little-endian), float32 (h, w, 2) u/v interleaved."""
    flow = np.asarray(flow, dtype="<f4")  # (2, h, w)
    _, h, w = flow.shape
    with open(path, "wb") as f:
        f.write(b"PIEH" + struct.pack("<ii", w, h) + flow.transpose(1, 2, 0).tobytes())


def write_pfm(path, flow):
    """PFM colour ('PF'), scale -1 (little-endian), float32 (h, w, 3) stored bottom row first."""
    flow = np.asarray(flow, dtype=np.float32)
    _, h, w = flow.shape
    data = np.concatenate([flow, np.zeros((1, h, w), np.float32)]).transpose(1, 2, 0)[::-1]
    with open(path, "wb") as f:
        f.write(f"PF\n{w} {h}\n-1.0\n".encode() + np.ascontiguousarray(data, dtype="<f4").tobytes())


def write_png16(path, rgb):
    """A 16-bit RGB PNG (PIL cannot write one): IHDR, one zlib IDAT of filter-0 rows, IEND."""
    rgb = np.asarray(rgb, dtype=">u2")
    h, w, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)


def write_kitti_flow(path, flow, valid):
    """KITTI flow PNG: R = u*64 + 2^15, G = v*64 + 2^15, B = valid (0/1), 16 bits each."""
    flow = np.asarray(flow, dtype=np.float64)
    enc = np.clip(np.round(flow * 64 + 2 ** 15), 0, 2 ** 16 - 1)
    write_png16(path, np.stack([enc[0], enc[1], np.asarray(valid, dtype=np.float64)], axis=-1))


def write_image(path, rng, h, w):
    Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)


def random_flow(rng, h, w):
    return rng.normal(0, 5, size=(2, h, w)).astype(np.float32)


# --------------------------------------------------------------------------- dataset trees
H, W = 24, 32


def make_chairs(root, layout, n=3, seed=0):
    """n pairs: 00001_img1.ppm, _img2.ppm, _flow.flo; split file 1 1 ... 2 (the last is val)."""
    rng = np.random.default_rng(seed)
    data = root / ("FlyingChairs/data" if layout == "torchvision" else "FlyingChairs_release/data")
    data.mkdir(parents=True)
    flows = []
    for i in range(1, n + 1):
        write_image(data / f"{i:05d}_img1.ppm", rng, H, W)
        write_image(data / f"{i:05d}_img2.ppm", rng, H, W)
        flows.append(random_flow(rng, H, W))
        write_flo(data / f"{i:05d}_flow.flo", flows[-1])
    split = "\n".join(["1"] * (n - 1) + ["2"]) + "\n"
    (root / ("FlyingChairs/FlyingChairs_train_val.txt" if layout == "torchvision" else "chairs_split.txt")
     ).write_text(split)
    return flows


def make_sintel(root, scenes=("alley_1", "market_2"), frames=3, seed=0, h=H, w=W):
    rng = np.random.default_rng(seed)
    flows = {}
    for scene in scenes:
        for p in ("clean", "final"):
            d = root / "Sintel/training" / p / scene
            d.mkdir(parents=True)
            for k in range(1, frames + 1):
                write_image(d / f"frame_{k:04d}.png", rng, h, w)
        d = root / "Sintel/training/flow" / scene
        d.mkdir(parents=True)
        for k in range(1, frames):
            flows[(scene, k)] = random_flow(rng, h, w)
            write_flo(d / f"frame_{k:04d}.flo", flows[(scene, k)])
    return flows


def make_kitti(root, layout, n=2, seed=0):
    rng = np.random.default_rng(seed)
    base = root / ("KittiFlow" if layout == "torchvision" else "KITTI") / "training"
    (base / "image_2").mkdir(parents=True)
    (base / "flow_occ").mkdir(parents=True)
    out = []
    for i in range(n):
        write_image(base / "image_2" / f"{i:06d}_10.png", rng, H, W)
        write_image(base / "image_2" / f"{i:06d}_11.png", rng, H, W)
        flow, valid = random_flow(rng, H, W), rng.random((H, W)) < 0.6
        write_kitti_flow(base / "flow_occ" / f"{i:06d}_10.png", flow, valid)
        out.append((flow, valid))
    return out


def make_things(root, frames=3, seed=0):
    rng = np.random.default_rng(seed)
    flows = {}
    for p in ("frames_cleanpass", "frames_finalpass"):
        for cam in ("left", "right"):
            d = root / "FlyingThings3D" / p / "TRAIN/A/0000" / cam
            d.mkdir(parents=True)
            for k in range(6, 6 + frames):
                write_image(d / f"{k:04d}.png", rng, H, W)
    for direction, tag in (("into_future", "IntoFuture"), ("into_past", "IntoPast")):
        for cam, c in (("left", "L"), ("right", "R")):
            d = root / "FlyingThings3D/optical_flow/TRAIN/A/0000" / direction / cam
            d.mkdir(parents=True)
            for k in range(6, 6 + frames):
                flows[(direction, cam, k)] = random_flow(rng, H, W)
                write_pfm(d / f"OpticalFlow{tag}_{k:04d}_{c}.pfm", flows[(direction, cam, k)])
    return flows


def make_hd1k(root, layout, frames=3, seed=0):
    rng = np.random.default_rng(seed)
    base = root / ("hd1k" if layout == "torchvision" else "HD1k")
    (base / "hd1k_input/image_2").mkdir(parents=True)
    (base / "hd1k_flow_gt/flow_occ").mkdir(parents=True)
    for k in range(frames):
        write_image(base / "hd1k_input/image_2" / f"000000_{k:04d}.png", rng, H, W)
        write_kitti_flow(base / "hd1k_flow_gt/flow_occ" / f"000000_{k:04d}.png", random_flow(rng, H, W),
                         np.ones((H, W)))


@pytest.fixture
def flow_trees():
    return {"chairs": make_chairs, "sintel": make_sintel, "kitti": make_kitti, "things": make_things,
            "hd1k": make_hd1k}


@pytest.fixture
def formats():
    return {"flo": write_flo, "pfm": write_pfm, "kitti": write_kitti_flow}


# --------------------------------------------------------------------------- upstream keys
def _conv(prefix, cout, cin, kh, kw=None, wn=False):
    kw = kh if kw is None else kw
    if wn:
        return {f"{prefix}.weight_g": (cout, 1, 1, 1), f"{prefix}.weight_v": (cout, cin, kh, kw),
                f"{prefix}.bias": (cout,)}
    return {f"{prefix}.weight": (cout, cin, kh, kw), f"{prefix}.bias": (cout,)}


def _bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}


def _encoder(prefix, out, batch_norm):
    keys = _conv(f"{prefix}.conv1", 64, 3, 7)
    if batch_norm:
        keys.update(_bn(f"{prefix}.norm1", 64))
    chans = [(64, 64, 1), (64, 96, 2), (96, 128, 2)]
    for li, (cin, c, stride) in enumerate(chans, start=1):
        for b in range(2):
            p = f"{prefix}.layer{li}.{b}"
            keys.update(_conv(f"{p}.conv1", c, cin if b == 0 else c, 3))
            keys.update(_conv(f"{p}.conv2", c, c, 3))
            if batch_norm:
                keys.update({**_bn(f"{p}.norm1", c), **_bn(f"{p}.norm2", c)})
                if b == 0 and stride != 1:
                    keys.update(_bn(f"{p}.norm3", c))  # RAFT's third norm: the shortcut's
            if b == 0 and stride != 1:
                keys.update(_conv(f"{p}.downsample.0", c, cin, 1))
                if batch_norm:
                    keys.update(_bn(f"{p}.downsample.1", c))
    keys.update(_conv(f"{prefix}.conv2", out, 128, 1))
    return keys


UPSTREAM_DIMS = {  # hdim, fnet out, c1, c2, f1, f2, cat, flow-head hidden
    "B": (128, 256, 256, 192, 128, 64, 128, 256),
    "H": (256, 256, 512, 384, 256, 128, 256, 512),
}


def upstream_layout(size="B", version="v2", weight_norm=True):
    """Key -> shape of DEQ-Flow's DEQFlow (TorchDEQ zoo / v2.0; v1.0 keeps the mask in the
    update block), written from its module list in the upstream notes, with `module.`."""
    hd, fo, c1, c2, f1, f2, cat, head = UPSTREAM_DIMS[size]
    keys = {**_encoder("fnet", fo, False), **_encoder("cnet", hd, True)}
    u = "update_block"
    for name, cout, cin, k in (("convc1", c1, 324, 1), ("convc2", c2, c1, 3), ("convf1", f1, 2, 7),
                               ("convf2", f2, f1, 3), ("conv", cat - 2, c2 + f2, 3)):
        keys.update(_conv(f"{u}.encoder.{name}", cout, cin, k, wn=weight_norm))
    for gate in "zrq":
        keys.update(_conv(f"{u}.gru.conv{gate}1", hd, hd + cat + hd, 1, 5, wn=weight_norm))
        keys.update(_conv(f"{u}.gru.conv{gate}2", hd, hd + cat + hd, 5, 1, wn=weight_norm))
    keys.update(_conv(f"{u}.flow_head.conv1", head, hd, 3, wn=weight_norm))
    keys.update(_conv(f"{u}.flow_head.conv2", 2, head, 3, wn=weight_norm))
    mask = f"{u}.mask" if version == "v1" else "mask"
    keys.update({**_conv(f"{mask}.0", 256, hd, 3), **_conv(f"{mask}.2", 576, 256, 1)})
    return {f"module.{k}": v for k, v in keys.items()}


@pytest.fixture
def upstream_state_dict():
    def make(size="B", version="v2", weight_norm=True, seed=0):
        g = torch.Generator().manual_seed(seed)
        out = {}
        for k, shape in upstream_layout(size, version, weight_norm).items():
            if k.endswith("num_batches_tracked"):
                out[k] = torch.tensor(7)
            elif k.endswith("running_var") or k.endswith("_g"):
                out[k] = torch.rand(shape, generator=g) + 0.5
            else:
                out[k] = torch.randn(shape, generator=g) * 0.05
        return out

    return make
