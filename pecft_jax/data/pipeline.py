"""Host-side batching: shuffling, resizing, augmentation, normalisation (images) or
tokenisation (text), host sharding.

Everything here is numpy on the host and deterministic:

* the order of an epoch is a permutation drawn from ``(seed, epoch)``;
* augmentation of step ``s`` is drawn from ``(seed, epoch, s)`` for the whole *global*
  batch, and each host keeps its slice, so the global batch does not depend on how many
  hosts share it;
* a task's training batches are a random-access sequence (:class:`TrainBatches`, and
  :class:`StreamBatches` for fixed-order passes): batch ``s`` is a function of ``s``, so
  grain (:mod:`pecft_jax.data.loader`) reads them in parallel and in order, and a resumed
  run starts at its step without reading the images of the earlier ones.

Every batch has the same shape (one compilation per run). Training batches drop the
remainder of an epoch (``drop_last``, TF's ``drop_remainder`` and the default) or keep it as
PyTorch's default ``DataLoader`` does: the last batch is then padded to full size and every
batch carries a ``mask`` (1 for real examples, 0 for padding), which the losses weight by.
Evaluation batches keep every example, the last one padded and masked the same way.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence, Tuple

import jax
import numpy as np

from pecft_jax.data.sources import ImageSource, LabelledSource, resize_bilinear

# Stream ids keep the shuffle and augmentation random streams apart for one seed (the third
# is the augmentation of the fixed-order passes, e.g. S-Prompts' k-means on augmented data).
_SHUFFLE_STREAM, _AUGMENT_STREAM, _PASS_AUGMENT_STREAM = 1, 2, 3

# How images are resampled (``Preprocess.resample``): this module's float bilinear, or PIL's
# filters as torchvision's transforms apply them to PIL images.
RESAMPLES = ("bilinear", "pil_bilinear", "pil_bicubic")
# how a random-resized crop's box is drawn: torchvision's RandomResizedCrop.get_params (the
# PyTorch codes), or TF's sample_distorted_bounding_box (the L2P / DualPrompt JAX code)
CROP_SAMPLERS = ("torchvision", "tf")
# What the host hands the devices (``Preprocess.pixels``): normalised float32 inputs, or the
# uint8 pixels, which the backbone normalises (``Backbone.apply``, through
# :func:`pixel_table`: the very values the host computes) -- a quarter of the bytes to
# stack, to copy out of grain's worker processes and to transfer, and no float pass on the
# host. Only where the preprocessing keeps whole pixel values (``Preprocess.whole_pixels``).
PIXELS = ("float32", "uint8")


def normalisation(mean: Sequence[float], std: Sequence[float]) -> tuple:
    """float32 ``(scale, shift)`` with ``(x / 255 - mean) / std == x * scale - shift``, in
    the one rounding that the host path and :func:`pixel_table` share."""
    std = np.asarray(std, np.float32)
    return 1.0 / (255.0 * std), np.asarray(mean, np.float32) / std


def pixel_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 ``(256, k)``: the normalised value of every uint8 pixel value per channel
    (``k`` 1 or the channels), computed as :func:`preprocess_images` computes it on float32
    pixels, so that a lookup on the device equals the host's normalisation bit for bit (XLA
    may fuse ``x * scale - shift`` differently, off by an ulp)."""
    scale, shift = normalisation(mean, std)
    values = np.arange(256, dtype=np.float32)[:, None]
    values = values * scale
    values -= shift
    return values


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How raw uint8 images become model inputs.

    Attributes:
      image_size: output height and width (bilinear resize when the source differs).
      channels: output channels; grey -> RGB repeats the channel, RGB -> grey averages.
      mean, std: per-channel normalisation of ``x / 255`` (length 1 broadcasts).
      augment: enables the augmentations below (training batches only).
      crop_padding: random crop after zero-padding by this many pixels per side, in output
        pixels (applied after resizing); 0 disables it.
      flip: random horizontal flip (wrong for digits and text: leave it off there).
      random_resized_crop: augmented batches are cut from the original image as torchvision's
        ``RandomResizedCrop(image_size, scale=crop_scale, ratio=crop_ratio)`` does (area
        fraction and aspect ratio drawn, ten tries, centre-crop fallback), then resized to
        ``image_size``: the training transform of the PyTorch prompt-method codes (DualPrompt
        and HiDe-Prompt ports, CODA-Prompt). Excludes ``crop_padding``.
      crop_scale, crop_ratio: the ranges of that crop's area fraction and aspect ratio.
      crop_sampler: how that crop's box is drawn -- ``'torchvision'`` (above) or ``'tf'``,
        ``tf.image.sample_distorted_bounding_box`` as the L2P / DualPrompt JAX pipeline calls
        it (aspect ratio uniform, then the *height* uniform among the integers that keep
        the area in range, 100 tries, the whole image as the fallback; see
        :func:`tf_distorted_box`): smaller crops on average than torchvision's area-uniform
        draw over the same ranges.
      resize_short: unaugmented batches (evaluation, cached features): the shorter side is
        resized to this, keeping the aspect ratio, and the central ``image_size`` square is
        kept -- torchvision's ``Resize(resize_short)`` + ``CenterCrop(image_size)``; None:
        resized straight to ``image_size``.
      squash: with ``resize_short``, every image is first squashed to ``resize_short`` x
        ``resize_short`` (aspect ratio not kept), and both crops are cut from that square --
        the official L2P / DualPrompt JAX input pipeline (``tf.image.resize(.., (256, 256))``).
      brightness: torchvision's ``ColorJitter(brightness=b)`` on augmented batches: pixels
        times a factor drawn from ``U[max(0, 1 - b), 1 + b]``, clipped to the valid range
        (HiDe-Prompt's CIFAR transform uses ``63/255``); 0 = off.
      resample: how images are resized. ``'bilinear'`` (default): each resize or crop samples
        the original once, bilinear in float with half-pixel centres and no antialiasing
        (TF's ``tf.image.resize``, the L2P / DualPrompt JAX pipeline; fast).
        ``'pil_bilinear'`` / ``'pil_bicubic'``: PIL resizes the uint8 images step by step
        as torchvision's transforms do on PIL images -- ``Resize(resize_short)`` resizes
        the whole image, then ``CenterCrop`` crops; antialiased when shrinking, rounded to
        uint8 after each step (and after the brightness jitter, which truncates as PIL's
        ``ImageEnhance`` does). Not with ``squash`` (TF's resize).
      crop_resample: the same for the random-resized crop (cropped, then resized), which
        has its own interpolation in torchvision (``RandomResizedCrop(224)`` is bilinear
        while the PyCIL-lineage test ``Resize(256, interpolation=3)`` is bicubic); None:
        ``resample``.
      pixels: ``'float32'``: normalised inputs; ``'uint8'``: the pixel values before the
        normalisation, for the backbone to normalise (the same values; see :data:`PIXELS`).
        Only where :meth:`whole_pixels` holds for every source read (the loop checks).
    """
    image_size: int
    channels: int
    mean: tuple = (0.5,)
    std: tuple = (0.5,)
    augment: bool = False
    crop_padding: int = 0
    flip: bool = False
    random_resized_crop: bool = False
    crop_scale: tuple = (0.08, 1.0)
    crop_ratio: tuple = (3 / 4, 4 / 3)
    crop_sampler: str = "torchvision"
    resize_short: int | None = None
    squash: bool = False
    brightness: float = 0.0
    resample: str = "bilinear"
    crop_resample: str | None = None
    pixels: str = "float32"

    def __post_init__(self):
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        for field in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, field))
            if len(value) not in (1, self.channels):
                raise ValueError(f"{field} needs 1 or {self.channels} values (one per output "
                                 f"channel), got {len(value)}")
            object.__setattr__(self, field, value)
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {self.crop_padding}")
        if self.random_resized_crop and self.crop_padding:
            raise ValueError("random_resized_crop and crop_padding are two training crops; "
                             "set augment.crop_padding=0 to use the random-resized crop")
        scale, ratio = (tuple(float(v) for v in r) for r in (self.crop_scale, self.crop_ratio))
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got "
                             f"{self.crop_scale}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"crop_ratio must be (low, high) with 0 < low <= high, got "
                             f"{self.crop_ratio}")
        object.__setattr__(self, "crop_scale", scale)
        object.__setattr__(self, "crop_ratio", ratio)
        if self.crop_sampler not in CROP_SAMPLERS:
            raise ValueError(f"crop_sampler must be one of {CROP_SAMPLERS}, got "
                             f"{self.crop_sampler!r}")
        if self.squash and self.resize_short is None:
            raise ValueError("squash needs resize_short (the side of the square images are "
                             "squashed to, e.g. eval.resize_short=256)")
        if not 0 <= self.brightness:
            raise ValueError(f"brightness must be >= 0, got {self.brightness}")
        if self.crop_resample is None:
            object.__setattr__(self, "crop_resample", self.resample)
        for field in ("resample", "crop_resample"):
            if getattr(self, field) not in RESAMPLES:
                raise ValueError(f"{field} must be one of {RESAMPLES}, got "
                                 f"{getattr(self, field)!r}")
        if self.squash and {self.resample, self.crop_resample} != {"bilinear"}:
            raise ValueError("squash reproduces TF's bilinear resize of the L2P / DualPrompt "
                             "JAX pipeline; use it with resample='bilinear' (and "
                             "crop_resample None or 'bilinear')")
        if self.pixels not in PIXELS:
            raise ValueError(f"pixels must be one of {PIXELS}, got {self.pixels!r}")
        if self.resize_short is not None and self.resize_short < self.image_size:
            raise ValueError(f"resize_short ({self.resize_short}) must be >= image_size "
                             f"({self.image_size}): the centre crop is cut from the resized image")

    @property
    def augments(self) -> bool:
        """Augmented batches differ from plain ones: augmentation on, and some of it set."""
        return self.augment and bool(self.crop_padding > 0 or self.flip
                                     or self.random_resized_crop or self.brightness)

    def whole_pixels(self, image_shape: tuple | None) -> bool:
        """Whether :func:`preprocess_images` keeps whole pixel values 0..255 up to the
        normalisation, for a source of ``image_shape`` (``(H, W, C)``; None: sizes vary,
        any channels): PIL's resampling (rounded to uint8), flips, padded crops, channel
        slices and copies, and an image already at ``image_size`` do; this module's float
        bilinear resampling, crops cut with it, an RGB -> grey average and the float
        brightness factor do not."""
        if self.channels == 1 and (image_shape is None or image_shape[2] != 1):
            return False  # averages RGB into grey
        if self.crops_training_images:  # PIL crops (its brightness truncates to whole values)
            return self.crop_resample != "bilinear"
        if self.resample != "bilinear":  # PIL resizes
            return True
        if self.centre_crops:
            return False  # a float bilinear crop
        # the fixed-size path: resized in float unless already at size (sources of varying
        # sizes are resized while read, to uint8); its brightness factor stays in float
        if image_shape is not None and tuple(image_shape[:2]) != (self.image_size,) * 2:
            return False
        return not (self.augment and self.brightness)

    @property
    def crops_training_images(self) -> bool:
        """Training batches are random-resized crops of the original images."""
        return self.augment and self.random_resized_crop

    @property
    def centre_crops(self) -> bool:
        """Unaugmented batches are ``resize_short`` centre crops of the original images."""
        return not self.augment and self.resize_short is not None

    @property
    def reads_originals(self) -> bool:
        """Batches are made from the original images in their own sizes (crops are cut from
        them, or PIL resizes them), not from images the source resized."""
        return (self.crops_training_images or self.centre_crops
                or self.resample != "bilinear")


def steps_per_epoch(num_examples: int, batch_size: int, drop_last: bool = True) -> int:
    """Training steps in one epoch: the full batches, and the partial one unless
    ``drop_last``."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if drop_last:
        return int(num_examples) // int(batch_size)
    return -(-int(num_examples) // int(batch_size))


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    """Evaluation batches needed for ``num_examples`` (the last one padded)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return -(-int(num_examples) // int(batch_size))


def _convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
    have = x.shape[-1]
    if have == 4:  # RGBA: the alpha channel carries no class information
        x, have = x[..., :3], 3
    if have == channels:
        return x
    if have == 1 and channels == 3:
        return np.repeat(x, 3, axis=-1)
    if have == 3 and channels == 1:
        return x.mean(axis=-1, keepdims=True, dtype=np.float32)
    raise ValueError(f"cannot convert images with {have} channels to {channels}")


def preprocess_images(images: np.ndarray | Sequence[np.ndarray], preprocess: Preprocess,
                      crops: np.ndarray | None = None, flips: np.ndarray | None = None,
                      draws: np.ndarray | None = None, brightness: np.ndarray | None = None
                      ) -> np.ndarray:
    """uint8 ``(n, h, w, c)`` -> float32 ``(n, S, S, C)`` normalised model inputs (with
    ``preprocess.pixels='uint8'``: uint8 ``(n, S, S, C)``, the pixel values before the
    normalisation).

    ``crops`` (``(n, 2)`` offsets into the padded image) and ``flips`` (``(n,)`` bool) apply
    the augmentation; None skips it. ``brightness`` (``(n,)`` factors) scales the pixels.
    ``draws`` (``(n, CROP_ATTEMPTS[crop_sampler], 4)`` uniforms) cut random-resized crops
    instead of resizing; with them, or with ``preprocess.centre_crops``, ``images`` are the
    originals (a list when their sizes differ).
    """
    size = preprocess.image_size
    resample = preprocess.resample if draws is None else preprocess.crop_resample
    if resample != "bilinear" or draws is not None or preprocess.centre_crops:
        x = (pil_images(images, preprocess, draws) if resample != "bilinear"
             else crop_images(images, preprocess, draws))
        if x.shape[-1] != 1 or preprocess.channels == 1:
            x = _convert_channels(x, preprocess.channels)
    else:
        x = original = np.asarray(images)
        if x.ndim != 4:
            raise ValueError(f"expected (n, H, W, C) images, got shape {x.shape}")
        # Work on as few channels as possible: reduce channels first; a grey image is
        # expanded to RGB only at the end, by the broadcast of the per-channel normalisation.
        if x.shape[-1] != 1 or preprocess.channels == 1:
            x = _convert_channels(x, preprocess.channels)
        if x.shape[1:3] != (size, size):
            x = resize_bilinear(x.astype(np.float32), size)
        elif np.may_share_memory(x, original):
            x = x.copy()  # flips and the normalisation work in place, never on the source's
    if crops is not None and preprocess.crop_padding > 0:
        x = _padded_crops(x, np.asarray(crops), preprocess.crop_padding)
    if flips is not None and preprocess.flip:
        flips = np.asarray(flips, bool)
        x[flips] = x[flips, :, ::-1]
    if brightness is not None and preprocess.brightness:
        x = x.astype(np.float32, copy=False)
        x *= np.asarray(brightness, np.float32)[:, None, None, None]
        np.clip(x, 0.0, 255.0, out=x)
        if resample != "bilinear":  # PIL's ImageEnhance.Brightness truncates to uint8
            np.trunc(x, out=x)
            if preprocess.pixels == "uint8":
                x = x.astype(np.uint8)
    if preprocess.pixels == "uint8":
        if x.dtype != np.uint8:  # a float step: the loop asks for uint8 only without one
            raise ValueError("Preprocess(pixels='uint8') on a path that resamples or averages "
                             "in float (see Preprocess.whole_pixels): use pixels='float32'")
        if x.shape[-1] != preprocess.channels:  # grey -> RGB here: every source's batches
            x = np.repeat(x, preprocess.channels, axis=-1)  # one shape (5-datasets mixes)
        return x
    x = x.astype(np.float32, copy=False)
    scale, shift = normalisation(preprocess.mean, preprocess.std)
    if x.shape[-1] == preprocess.channels:
        x *= scale
        x -= shift
        return x
    out = np.empty(x.shape[:3] + (preprocess.channels,), np.float32)  # grey -> RGB
    np.multiply(x, scale, out=out)
    out -= shift
    return out


# A crop box is (top, left, height, width) in the original image's pixels (floats allowed),
# plus whether sampling is clamped to the box (a crop that is then resized) or to the image
# (a resize of the whole image that is then cropped).
# boxes tried before the fallback: torchvision's RandomResizedCrop ten, TF's
# sample_distorted_bounding_box max_attempts=100 (its default, which L2P's code keeps)
CROP_ATTEMPTS = {"torchvision": 10, "tf": 100}


def crop_box(preprocess: Preprocess, height: int, width: int, draws: np.ndarray) -> tuple:
    """The random-resized crop's box on an ``height x width`` image by
    ``preprocess.crop_sampler``, from ``draws`` (``CROP_ATTEMPTS[sampler]`` rows of 4)."""
    sample = tf_distorted_box if preprocess.crop_sampler == "tf" else random_resized_box
    return sample(height, width, draws, preprocess.crop_scale, preprocess.crop_ratio)


def tf_distorted_box(height: int, width: int, draws: np.ndarray, scale: tuple,
                     ratio: tuple) -> tuple[int, int, int, int]:
    """TF's ``sample_distorted_bounding_box`` (``GenerateRandomCrop`` in
    ``sample_distorted_bounding_box_op.cc``) with no bounding boxes and
    ``min_object_covered=0``, as L2P's ``decode_and_random_resized_crop`` calls it
    (``area_range=scale``, ``aspect_ratio_range=ratio``), with its random numbers given:
    ``draws`` ``(100, 4)`` uniforms in [0, 1) (aspect ratio, height, top, left for each
    try). Per try: the aspect ratio ``w/h`` uniform in ``ratio``; the height an integer
    uniform from the one of the smallest allowed area to the largest that fits; the width
    ``rint(h * aspect)``; a box off the area range by rounding grows or shrinks by a row,
    else the try fails. The whole image if every try fails."""
    min_area, max_area = scale[0] * height * width, scale[1] * height * width
    for u_ratio, u_height, u_top, u_left in np.asarray(draws, np.float64):
        aspect = ratio[0] + u_ratio * (ratio[1] - ratio[0])
        h = int(np.rint(np.sqrt(min_area / aspect)))
        max_h = int(np.rint(np.sqrt(max_area / aspect)))
        if np.rint(max_h * aspect) > width:  # the tallest box whose width still fits
            max_h = int((width + 0.5 - 1e-7) / aspect)
            if np.rint(max_h * aspect) > width:
                max_h -= 1
        max_h = min(max_h, height)
        h = min(h, max_h)
        if h < max_h:
            h += int(u_height * (max_h - h + 1))  # Uniform(max_h - h + 1): [0, max_h - h]
        w = int(np.rint(h * aspect))
        if w * h < min_area:
            h += 1
            w = int(np.rint(h * aspect))
        if w * h > max_area:
            h -= 1
            w = int(np.rint(h * aspect))
        if not (min_area <= w * h <= max_area and 0 < w <= width and 0 < h <= height):
            continue
        top = int(u_top * (height - h)) if h < height else 0  # Uniform(H - h): [0, H - h)
        left = int(u_left * (width - w)) if w < width else 0
        return top, left, h, w
    return 0, 0, height, width


def random_resized_box(height: int, width: int, draws: np.ndarray, scale: tuple,
                       ratio: tuple) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` on an ``height x width`` image, with
    its random numbers given: ``draws`` ``(10, 4)`` uniforms in [0, 1) (area fraction, log
    aspect ratio, top, left for each try), so a batch's boxes come from one generator."""
    area = height * width
    log_ratio = np.log(ratio)
    for u_area, u_ratio, u_top, u_left in np.asarray(draws, np.float64):
        target = area * (scale[0] + u_area * (scale[1] - scale[0]))
        aspect = np.exp(log_ratio[0] + u_ratio * (log_ratio[1] - log_ratio[0]))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w
    in_ratio = width / height  # fallback: the largest centred box within the ratio range
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resize_short_geometry(height: int, width: int, resize_short: int, size: int
                          ) -> tuple[int, int, int, int]:
    """``(new_h, new_w, top, left)`` of torchvision's ``Resize(resize_short)`` (the short
    side to ``resize_short``, the long one truncated) and ``CenterCrop(size)`` (its offsets
    rounded) on an ``height x width`` image."""
    if height <= width:
        new_h, new_w = resize_short, int(resize_short * width / height)
    else:
        new_h, new_w = int(resize_short * height / width), resize_short
    return new_h, new_w, int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))


def centre_box(height: int, width: int, resize_short: int, size: int
               ) -> tuple[float, float, float, float]:
    """The part of an ``height x width`` image that ``Resize(resize_short)`` +
    ``CenterCrop(size)`` keep, in original pixels (torchvision's rounding of both)."""
    new_h, new_w, top, left = resize_short_geometry(height, width, resize_short, size)
    sy, sx = height / new_h, width / new_w
    return top * sy, left * sx, size * sy, size * sx


def resample_box(image: np.ndarray, box: tuple, size: int, clamp_to_box: bool) -> np.ndarray:
    """Bilinear samples of ``image`` ``(H, W, C)`` over ``box`` on a ``size x size`` grid
    of half-pixel centres; edge pixels repeat the box's (a cropped image) or the image's
    (a resized image) border. float32 ``(size, size, C)``."""
    top, left, height, width = box
    rows, cols = image.shape[:2]

    def axis(start: float, extent: float, n_in: int):
        centres = start + (np.arange(size) + 0.5) * (extent / size) - 0.5
        lo_edge, hi_edge = ((start, start + extent - 1) if clamp_to_box else (0, n_in - 1))
        centres = np.clip(centres, lo_edge, hi_edge)
        lo = np.floor(centres).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, (centres - lo).astype(np.float32)

    y_lo, y_hi, y_frac = axis(top, height, rows)
    x_lo, x_hi, x_frac = axis(left, width, cols)
    # rows are gathered from the uint8 image and become float32 in the products: no float
    # copy of a whole (possibly large) original
    r = image[y_lo] * (1 - y_frac)[:, None, None] + image[y_hi] * y_frac[:, None, None]
    return r[:, x_lo] * (1 - x_frac)[None, :, None] + r[:, x_hi] * x_frac[None, :, None]


def crop_images(images: Sequence[np.ndarray], preprocess: Preprocess,
                draws: np.ndarray | None = None) -> np.ndarray:
    """Originals of any sizes -> float32 ``(n, S, S, C)``: random-resized crops when
    ``draws`` (``(n, attempts, 4)`` uniforms) are given, else the ``resize_short`` centre crop."""
    size = preprocess.image_size
    out = []
    for i, image in enumerate(images):
        h, w = image.shape[:2]
        # a squashed image is an (R, R) square: boxes are found there and mapped back
        side = preprocess.resize_short if preprocess.squash else None
        vh, vw = (side, side) if side else (h, w)
        if draws is not None:
            box = crop_box(preprocess, vh, vw, draws[i])
        else:
            box = centre_box(vh, vw, preprocess.resize_short, size)
        if side:
            box = (box[0] * h / side, box[1] * w / side, box[2] * h / side, box[3] * w / side)
        out.append(resample_box(image, box, size, clamp_to_box=draws is not None))
    return np.stack(out) if out else np.zeros((0, size, size, 1), np.float32)


def pil_images(images: Sequence[np.ndarray], preprocess: Preprocess,
               draws: np.ndarray | None = None) -> np.ndarray:
    """Originals of any sizes (uint8 ``(H, W, C)``) -> uint8 ``(n, S, S, C)``, resampled by
    PIL as torchvision's transforms do on PIL images: with ``draws``
    (``(n, attempts, 4)`` uniforms) ``RandomResizedCrop`` -- the box of :func:`crop_box`,
    cropped, then resized to ``S x S``; else with
    ``resize_short`` ``Resize(resize_short)`` + ``CenterCrop(S)``; else ``Resize((S, S))``
    (filters: ``preprocess.crop_resample`` for the crops, ``preprocess.resample`` else)."""
    from PIL import Image  # Pillow: a dependency; imported here so numpy-only runs skip it
    filters = {"pil_bilinear": Image.BILINEAR, "pil_bicubic": Image.BICUBIC}
    method = filters[preprocess.resample if draws is None else preprocess.crop_resample]
    size = preprocess.image_size
    out = []
    for i, image in enumerate(images):
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise ValueError(f"PIL resampling needs uint8 images, got {image.dtype}")
        if image.shape[-1] == 4:  # RGBA: the alpha channel carries no class information
            image = image[..., :3]
        h, w = image.shape[:2]
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        if draws is not None:
            top, left, bh, bw = crop_box(preprocess, h, w, draws[i])
            pil = pil.crop((left, top, left + bw, top + bh)).resize((size, size), method)
        elif preprocess.resize_short is not None:
            new_h, new_w, top, left = resize_short_geometry(h, w, preprocess.resize_short, size)
            if (new_h, new_w) != (h, w):
                pil = pil.resize((new_w, new_h), method)
            pil = pil.crop((left, top, left + size, top + size))
        elif (h, w) != (size, size):
            pil = pil.resize((size, size), method)
        x = np.asarray(pil)
        out.append(x[..., None] if x.ndim == 2 else x)
    return np.stack(out) if out else np.zeros((0, size, size, 1), np.uint8)


def _padded_crops(x: np.ndarray, offsets: np.ndarray, padding: int) -> np.ndarray:
    """Crop each image at ``offsets`` (dy, dx) of its zero-padded version (black border, as
    in the usual ``RandomCrop(size, padding)``) without building the padded batch."""
    size = x.shape[1]
    out = np.zeros_like(x)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        sy, sx = dy - padding, dx - padding  # shift of the source relative to the output
        ys, xs = slice(max(0, -sy), size - max(0, sy)), slice(max(0, -sx), size - max(0, sx))
        out[i, ys, xs] = x[i, max(0, sy):size + min(0, sy), max(0, sx):size + min(0, sx)]
    return out


def _host_slice(batch_size: int, process_index: int, process_count: int) -> slice:
    """This host's rows of a global batch (checked: the hosts split it evenly)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must lie in [0, {process_count})")
    if batch_size % process_count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by the "
                         f"{process_count} hosts; pick a multiple of {process_count}")
    local = batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)


def _augmentation(preprocess: Preprocess, batch_size: int, mine: slice, seed: tuple):
    """This host's ``(crops, flips, draws, brightness factors)`` of a global batch (None each
    when there is no augmentation), drawn for the whole global batch from ``seed`` and then
    sliced, so they do not depend on the number of hosts."""
    if not preprocess.augments:
        return None, None, None, None
    rng = np.random.default_rng([int(v) for v in seed])
    crops = rng.integers(0, 2 * preprocess.crop_padding + 1, size=(batch_size, 2))[mine]
    flips = (rng.random(batch_size) < 0.5)[mine]
    draws = (rng.random((batch_size, CROP_ATTEMPTS[preprocess.crop_sampler], 4))[mine]
             if preprocess.random_resized_crop else None)
    factors = None
    if preprocess.brightness:
        b = preprocess.brightness
        factors = rng.uniform(max(0.0, 1.0 - b), 1.0 + b, size=batch_size)[mine]
    return crops, flips, draws, factors


def _mapped_labels(source: LabelledSource, indices: np.ndarray, label_map: np.ndarray
                   ) -> np.ndarray:
    label_map = np.asarray(label_map)
    original = source.labels[indices]
    if original.size and original.max() >= len(label_map):
        raise ValueError(f"label_map has {len(label_map)} entries but {source.name} has label "
                         f"{original.max()}; use scenario.label_map()")
    mapped = label_map[original]
    if (mapped < 0).any():
        missing = sorted(set(original[mapped < 0].tolist()))
        raise ValueError(f"classes {missing} of {source.name} have no entry in label_map (-1); "
                         "these indices do not belong to the scenario")
    return mapped.astype(np.int32)


def _read(source: ImageSource, indices: np.ndarray, preprocess: Preprocess
          ) -> np.ndarray | list[np.ndarray]:
    # Crops and PIL resizes start from the originals. Otherwise sources of varying image size
    # must resize while reading; fixed-size ones are resized in float later (no double rounding).
    if preprocess.reads_originals:
        return source.raw_images(indices)
    return source.images(indices, size=None if source.image_shape else preprocess.image_size)


def prepare_inputs(source: LabelledSource, indices: np.ndarray, preprocess: Any,
                   augmentation: tuple = (None, None, None, None)) -> Any:
    """The backbone's inputs for ``source``'s examples at ``indices``: preprocessed images
    ``float32 (n, S, S, C)`` for an image ``Preprocess``, or the token arrays
    ``{'token_ids', 'attention_mask'}`` for a :class:`~pecft_jax.data.text.TextPreprocess`
    (text has no augmentation)."""
    if source.modality == "text":
        if isinstance(preprocess, Preprocess):
            raise ValueError(f"{source.name} holds text, but the pipeline was given an image "
                             f"Preprocess; a text backbone tokenises it")
        return preprocess(source.texts(indices))
    return preprocess_images(_read(source, indices, preprocess), preprocess, *augmentation)


def concat_inputs(pieces: Sequence[Any]) -> Any:
    """Concatenates inputs along the batch axis (arrays, or dicts of arrays for text)."""
    return jax.tree_util.tree_map(lambda *parts: np.concatenate(parts), *pieces)


def _as_indices(indices) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.size == 0:
        return np.zeros(0, np.int64)
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
        raise TypeError(f"indices must be a 1-D integer array, got {indices.dtype}{indices.shape}")
    return indices.astype(np.int64)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The order of an epoch: a permutation of ``range(num_examples)`` from ``(seed, epoch)``."""
    rng = np.random.default_rng([_SHUFFLE_STREAM, int(seed), int(epoch)])
    return rng.permutation(num_examples)


class TrainBatches:
    """A task's training batches as a random-access sequence: item ``s`` is this host's shard
    of the global batch of step ``s`` (epoch ``s // per_epoch``).

    Each item is a pure function of ``s``: the order of an epoch is drawn from ``(seed,
    epoch)`` and a step's augmentation from ``(seed, epoch, step in the epoch)`` for the whole
    global batch. So any reader -- this thread, grain's reading threads or its worker
    processes (:mod:`pecft_jax.data.loader`) -- builds any step, in any order, and a resumed
    run rebuilds exactly the batches an uninterrupted one would have seen.

    Args:
      source, indices: the examples (``indices`` into ``source``), e.g. a task's train stream.
      label_map: original label -> trained label (``scenario.label_map()``); every example's
        label is checked once, here.
      batch_size: global batch size; an item holds ``batch_size // process_count`` examples.
      seed: determines the orders and the augmentation (use a per-task seed).
      preprocess: resizing, channels, normalisation, augmentation (or tokenisation).
      epochs: epochs in the sequence (its length is ``epochs * per_epoch``).
      process_index, process_count: this host and the number of hosts.
      drop_last: drop each epoch's last partial batch (True), or keep it (False): padded to
        ``batch_size`` with rows that repeat its own examples, masked out.
      cross_epochs: batches cut from the epochs' orders one after another, so a batch may
        end in the next epoch, as a ``tf.data`` pipeline that repeats the shuffled examples
        before it batches them (the L2P / DualPrompt JAX code's, clu ``create_dataset``):
        the same number of steps, ``epochs * (N // batch_size)``, so the stream's last
        ``epochs * (N % batch_size)`` examples go unread (whole epochs where that reaches
        N). Only with ``drop_last``.
      reshuffle: a new order every epoch (True), or epoch 0's order for every epoch (False:
        a loader without ``shuffle`` over examples shuffled once, Progressive Prompts' BERT
        code).

    Items: ``{'inputs': float32 (b, S, S, C), 'label': int32 (b,), 'index': int32 (b,)}``
    (for text ``inputs`` is ``{'token_ids', 'attention_mask'}``, int32 ``(b, L)``); ``index``
    is the example's position in ``indices`` (what rows of a per-task feature cache are keyed
    by). Unless ``drop_last``, every item also holds ``'mask'``, float32 ``(b,)``: 1.0 for the
    examples, 0.0 for the padding (all ones but in an epoch's last batch), so that the steps of
    a run keep one structure. The full batches are the same with either setting.
    """

    def __init__(self, source: LabelledSource, indices: np.ndarray, label_map: np.ndarray, *,
                 batch_size: int, seed: int, preprocess: Any, epochs: int = 1,
                 process_index: int = 0, process_count: int = 1, drop_last: bool = True,
                 cross_epochs: bool = False, reshuffle: bool = True):
        if cross_epochs and not drop_last:
            raise ValueError("batches that cross epochs have no partial batch to keep: "
                             "cross_epochs needs drop_last")
        self.cross_epochs, self.reshuffle = bool(cross_epochs), bool(reshuffle)
        self.mine = _host_slice(batch_size, process_index, process_count)
        self.source, self.indices = source, _as_indices(indices)
        self.batch_size, self.seed, self.preprocess = int(batch_size), int(seed), preprocess
        self.drop_last = bool(drop_last)
        self.per_epoch = steps_per_epoch(len(self.indices), batch_size, self.drop_last)
        if self.per_epoch == 0:
            raise ValueError(f"{len(self.indices)} training examples of {source.name} do not "
                             f"fill one batch of {batch_size}; lower batch_size"
                             + (" or keep the partial batch (drop_last=False)"
                                if len(self.indices) else ""))
        if epochs <= 0:
            raise ValueError(f"epochs must be positive, got {epochs}")
        self.epochs = int(epochs)
        self.labels = _mapped_labels(source, self.indices, label_map)
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.epochs * self.per_epoch

    def examples_in(self, step: int) -> int:
        """The real examples in step ``step``'s global batch (fewer in a kept partial one)."""
        if self.drop_last:
            return self.batch_size
        offset = int(step) % self.per_epoch
        return min(self.batch_size, len(self.indices) - offset * self.batch_size)

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of epoch ``epoch``, kept for the few epochs being read (two
        threads may both draw it: they draw the same one)."""
        epoch = epoch if self.reshuffle else 0
        order = self._orders.get(epoch)
        if order is None:
            order = epoch_permutation(len(self.indices), self.seed, epoch)
            if len(self._orders) >= 4:
                self._orders.clear()
            self._orders[epoch] = order
        return order

    def __getitem__(self, step: int) -> dict[str, Any]:
        step = int(step)
        if not 0 <= step < len(self):
            raise IndexError(f"step {step} outside the {len(self)} steps of these batches")
        epoch, offset = divmod(step, self.per_epoch)
        size = self.batch_size
        if self.cross_epochs:  # rows step * size .. of the epochs' orders end to end
            n = len(self.indices)
            first, start = divmod(step * size, n)
            positions = self.order(first)[start:start + size]
            if len(positions) < size:  # the batch runs into the next epoch
                following = self.order(first + 1)[:size - len(positions)]
                positions = np.concatenate([positions, following])
        else:
            positions = self.order(epoch)[offset * size:(offset + 1) * size]
        real = len(positions)
        # an epoch's partial last batch: its own examples again as padding (valid inputs and
        # cached-feature rows), masked out of every loss
        positions = np.resize(positions, size)[self.mine]
        augmentation = _augmentation(self.preprocess, size, self.mine,
                                     (_AUGMENT_STREAM, self.seed, epoch, offset))
        item = {"inputs": prepare_inputs(self.source, self.indices[positions], self.preprocess,
                                         augmentation),
                "label": self.labels[positions], "index": positions.astype(np.int32)}
        if not self.drop_last:
            item["mask"] = (np.arange(size) < real).astype(np.float32)[self.mine]
        return item


def train_batches(source: LabelledSource, indices: np.ndarray, label_map: np.ndarray, *,
                  batch_size: int, seed: int, epoch: int, preprocess: Preprocess,
                  start_step: int = 0, process_index: int = 0, process_count: int = 1,
                  drop_last: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of :class:`TrainBatches` read in this thread: the batches of steps
    ``start_step ..`` of epoch ``epoch`` (earlier steps are skipped without reading images);
    the arguments are :class:`TrainBatches`'."""
    batches = TrainBatches(source, indices, label_map, batch_size=batch_size, seed=seed,
                           preprocess=preprocess, epochs=epoch + 1,
                           process_index=process_index, process_count=process_count,
                           drop_last=drop_last)
    steps = batches.per_epoch
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step} outside [0, {steps}] for this epoch")
    return (batches[epoch * steps + step] for step in range(start_step, steps))


def eval_batches(source: LabelledSource, indices: np.ndarray, label_map: np.ndarray, *,
                 batch_size: int, preprocess: Preprocess, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """All examples in order, this host's shard of each global batch, no augmentation:
    :func:`eval_stream` of the one part ``(source, indices)``."""
    return eval_stream([(source, indices)], label_map, batch_size=batch_size,
                       preprocess=preprocess, process_index=process_index,
                       process_count=process_count)


class StreamBatches:
    """The examples of several ``(source, indices)`` parts one after another (e.g. the test
    sets of tasks 0..t) in fixed-size batches, as a random-access sequence: item ``b`` is this
    host's shard of global batch ``b``; augmented by ``preprocess`` (drawn from
    ``augment_seed`` and the batch) only when ``augment_seed`` is given.

    Batches run across the parts' boundaries, so only the stream's last global batch is
    padded (by repeating the stream's last example) to full size; ``mask`` is 1.0 for real
    examples and 0.0 for padding, so ``sum(mask)`` over all hosts and batches equals the
    number of examples. A part's examples are decoded and resized by its own source, so parts
    of different image sizes (a dataset sequence) share a batch.

    Items: ``{'inputs': float32 (b, S, S, C) or the token arrays, 'label': int32 (b,),
    'mask': float32 (b,), 'index': int32 (b,)}``; ``index`` is the example's position in the
    stream (part 0's examples first); padding rows carry positions past the end. Without
    ``read_inputs`` the items have no ``'inputs'`` and nothing is decoded: the labels are in
    memory (an evaluation from cached features needs nothing else).
    """

    def __init__(self, parts: Sequence[Tuple[LabelledSource, np.ndarray]],
                 label_map: np.ndarray, *, batch_size: int, preprocess: Any,
                 process_index: int = 0, process_count: int = 1,
                 augment_seed: int | None = None, read_inputs: bool = True):
        self.mine = _host_slice(batch_size, process_index, process_count)
        self.parts = [(source, _as_indices(indices)) for source, indices in parts]
        self.labels = np.concatenate([_mapped_labels(source, indices, label_map)
                                      for source, indices in self.parts]
                                     or [np.zeros(0, np.int32)])
        self.starts = np.cumsum([0] + [len(indices) for _, indices in self.parts])
        self.total = int(self.starts[-1])
        self.batch_size, self.augment_seed = int(batch_size), augment_seed
        self.read_inputs = read_inputs
        if augment_seed is None:
            preprocess = dataclasses.replace(preprocess, augment=False)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return num_eval_batches(self.total, self.batch_size)

    def _read(self, positions: np.ndarray, augmentation: tuple) -> Any:
        """Prepared inputs at stream ``positions`` (ascending), part by part."""
        pieces = []
        for (source, indices), lo, hi in zip(self.parts, self.starts[:-1], self.starts[1:]):
            inside = (positions >= lo) & (positions < hi)
            if inside.any():
                pieces.append(prepare_inputs(
                    source, indices[positions[inside] - lo], self.preprocess,
                    tuple(None if a is None else a[inside] for a in augmentation)))
        return concat_inputs(pieces)

    def __getitem__(self, b: int) -> dict[str, Any]:
        b = int(b)
        if not 0 <= b < len(self):
            raise IndexError(f"batch {b} outside the {len(self)} batches of this stream")
        start = b * self.batch_size
        order = np.arange(start, start + self.batch_size)
        mask = (order < self.total).astype(np.float32)
        # padding rows repeat the last example (whose cached features they then get)
        positions = np.where(mask > 0, order, self.total - 1)[self.mine]
        augmentation = (_augmentation(self.preprocess, self.batch_size, self.mine,
                                      (_PASS_AUGMENT_STREAM, self.augment_seed, start))
                        if self.augment_seed is not None else (None, None, None, None))
        batch = {"label": self.labels[positions], "mask": mask[self.mine],
                 "index": order[self.mine].astype(np.int32)}
        if self.read_inputs:  # ascending positions: padding is last
            batch["inputs"] = self._read(positions, augmentation)
        return batch


def eval_stream(parts: Sequence[Tuple[LabelledSource, np.ndarray]], label_map: np.ndarray, *,
                batch_size: int, preprocess: Preprocess, process_index: int = 0,
                process_count: int = 1, augment_seed: int | None = None
                ) -> Iterator[dict[str, np.ndarray]]:
    """:class:`StreamBatches` read in order in this thread (the arguments are its)."""
    stream = StreamBatches(parts, label_map, batch_size=batch_size, preprocess=preprocess,
                           process_index=process_index, process_count=process_count,
                           augment_seed=augment_seed)
    return (stream[b] for b in range(len(stream)))
