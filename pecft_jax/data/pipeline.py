"""Host-side batching: shuffling, resizing, augmentation, normalisation, host sharding.

Everything here is numpy on the host and deterministic:

* the order of an epoch is a permutation drawn from ``(seed, epoch)``;
* augmentation of step ``s`` is drawn from ``(seed, epoch, s)`` for the whole *global*
  batch, and each host keeps its slice, so the global batch does not depend on how many
  hosts share it;
* ``start_step`` skips batches without reading their images, so a resumed run sees the
  same batches as an uninterrupted one.

Training batches drop the remainder of an epoch so every step has the same shape (one
compilation per task). Evaluation batches keep every example: the last batch is padded to
full size and carries a ``mask`` (1 for real examples, 0 for padding).
"""
from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Iterator, Sequence, Tuple

import numpy as np

from pecft_jax.data.sources import ImageSource, resize_bilinear

# Stream ids keep the shuffle and augmentation random streams apart for one seed.
_SHUFFLE_STREAM, _AUGMENT_STREAM = 1, 2


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
    """
    image_size: int
    channels: int
    mean: tuple = (0.5,)
    std: tuple = (0.5,)
    augment: bool = False
    crop_padding: int = 0
    flip: bool = False

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


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Training steps in one epoch (the remainder is dropped)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return int(num_examples) // int(batch_size)


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


def preprocess_images(images: np.ndarray, preprocess: Preprocess,
                      crops: np.ndarray | None = None, flips: np.ndarray | None = None
                      ) -> np.ndarray:
    """uint8 ``(n, h, w, c)`` -> float32 ``(n, S, S, C)`` normalised model inputs.

    ``crops`` (``(n, 2)`` offsets into the padded image) and ``flips`` (``(n,)`` bool) apply
    the augmentation; None skips it.
    """
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"expected (n, H, W, C) images, got shape {x.shape}")
    size = preprocess.image_size
    x = x.astype(np.float32)
    # Work on as few channels as possible: reduce channels first; a grey image is expanded
    # to RGB only at the end, by the broadcast of the per-channel normalisation.
    if x.shape[-1] != 1 or preprocess.channels == 1:
        x = _convert_channels(x, preprocess.channels)
    if x.shape[1:3] != (size, size):
        x = resize_bilinear(x, size)
    if crops is not None and preprocess.crop_padding > 0:
        x = _padded_crops(x, np.asarray(crops), preprocess.crop_padding)
    if flips is not None and preprocess.flip:
        flips = np.asarray(flips, bool)
        x[flips] = x[flips, :, ::-1]
    std = np.asarray(preprocess.std, np.float32)
    scale = 1.0 / (255.0 * std)
    shift = np.asarray(preprocess.mean, np.float32) / std
    if x.shape[-1] == preprocess.channels:
        x *= scale
        x -= shift
        return x
    out = np.empty(x.shape[:3] + (preprocess.channels,), np.float32)  # grey -> RGB
    np.multiply(x, scale, out=out)
    out -= shift
    return out


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


def _check_sharding(batch_size: int, process_index: int, process_count: int) -> int:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} must lie in [0, {process_count})")
    if batch_size % process_count:
        raise ValueError(f"global batch_size {batch_size} is not divisible by the "
                         f"{process_count} hosts; pick a multiple of {process_count}")
    return batch_size // process_count


def _mapped_labels(source: ImageSource, indices: np.ndarray, label_map: np.ndarray) -> np.ndarray:
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


def _read(source: ImageSource, indices: np.ndarray, preprocess: Preprocess) -> np.ndarray:
    # Sources of varying image size must resize while reading; fixed-size ones are resized
    # in float later (no double rounding).
    return source.images(indices, size=None if source.image_shape else preprocess.image_size)


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


def train_batches(source: ImageSource, indices: np.ndarray, label_map: np.ndarray, *,
                  batch_size: int, seed: int, epoch: int, preprocess: Preprocess,
                  start_step: int = 0, process_index: int = 0, process_count: int = 1
                  ) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of shuffled training batches, this host's shard.

    Args:
      source, indices: the examples (``indices`` into ``source``), e.g. a task's train stream.
      label_map: original label -> trained label (``scenario.label_map()``).
      batch_size: global batch size; this host yields ``batch_size // process_count``.
      seed, epoch: determine the order and the augmentation (use a per-task seed).
      preprocess: resizing, channels, normalisation, augmentation.
      start_step: first step to yield (earlier steps are skipped without reading images).
      process_index, process_count: this host and the number of hosts.

    Yields:
      ``{'image': float32 (b, S, S, C), 'label': int32 (b,), 'index': int32 (b,)}``,
      ``steps_per_epoch`` of them minus ``start_step``; ``index`` is the example's position
      in ``indices`` (what rows of a per-task feature cache are keyed by).
    """
    local = _check_sharding(batch_size, process_index, process_count)
    indices = _as_indices(indices)
    steps = steps_per_epoch(len(indices), batch_size)
    if steps == 0:
        raise ValueError(f"{len(indices)} training examples of {source.name} do not fill one "
                         f"batch of {batch_size}; lower batch_size")
    if not 0 <= start_step <= steps:
        raise ValueError(f"start_step {start_step} outside [0, {steps}] for this epoch")
    labels = _mapped_labels(source, indices, label_map)  # validates every example once
    order = epoch_permutation(len(indices), seed, epoch)
    mine = slice(process_index * local, (process_index + 1) * local)
    augment = preprocess.augment and (preprocess.crop_padding > 0 or preprocess.flip)

    def generate():
        for step in range(start_step, steps):
            positions = order[step * batch_size:(step + 1) * batch_size][mine]
            crops = flips = None
            if augment:
                # Drawn for the global batch, then sliced: independent of the host count.
                rng = np.random.default_rng([_AUGMENT_STREAM, int(seed), int(epoch), step])
                crops = rng.integers(0, 2 * preprocess.crop_padding + 1, size=(batch_size, 2))
                flips = rng.random(batch_size) < 0.5
                crops, flips = crops[mine], flips[mine]
            images = _read(source, indices[positions], preprocess)
            yield {"image": preprocess_images(images, preprocess, crops, flips),
                   "label": labels[positions], "index": positions.astype(np.int32)}

    return generate()


def eval_batches(source: ImageSource, indices: np.ndarray, label_map: np.ndarray, *,
                 batch_size: int, preprocess: Preprocess, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """All examples in order, this host's shard of each global batch, no augmentation:
    :func:`eval_stream` of the one part ``(source, indices)``."""
    return eval_stream([(source, indices)], label_map, batch_size=batch_size,
                       preprocess=preprocess, process_index=process_index,
                       process_count=process_count)


def eval_stream(parts: Sequence[Tuple[ImageSource, np.ndarray]], label_map: np.ndarray, *,
                batch_size: int, preprocess: Preprocess, process_index: int = 0,
                process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """The examples of several ``(source, indices)`` parts one after another (e.g. the test
    sets of tasks 0..t), this host's shard of each global batch, no augmentation.

    Batches run across the parts' boundaries, so only the stream's last global batch is
    padded (by repeating the stream's last example) to full size; ``mask`` is 1.0 for real examples
    and 0.0 for padding, so ``sum(mask)`` over all hosts and batches equals the number of
    examples. A part's examples are decoded and resized by its own source, so parts of
    different image sizes (a dataset sequence) share a batch.

    Yields:
      ``{'image': float32 (b, S, S, C), 'label': int32 (b,), 'mask': float32 (b,),
      'index': int32 (b,)}``; ``index`` is the example's position in the stream (part 0's
      examples first); padding rows carry positions past the end.
    """
    local = _check_sharding(batch_size, process_index, process_count)
    parts = [(source, _as_indices(indices)) for source, indices in parts]
    labels = np.concatenate([_mapped_labels(source, indices, label_map)
                             for source, indices in parts] or [np.zeros(0, np.int32)])
    starts = np.cumsum([0] + [len(indices) for _, indices in parts])
    total = int(starts[-1])
    mine = slice(process_index * local, (process_index + 1) * local)

    def read(positions: np.ndarray) -> np.ndarray:
        """Preprocessed images at stream ``positions`` (ascending), part by part."""
        pieces = []
        for (source, indices), lo, hi in zip(parts, starts[:-1], starts[1:]):
            inside = positions[(positions >= lo) & (positions < hi)]
            if len(inside):
                pieces.append(preprocess_images(_read(source, indices[inside - lo], preprocess),
                                                preprocess))
        return np.concatenate(pieces)

    def generate():
        for start in range(0, total, batch_size):
            order = np.arange(start, start + batch_size)
            mask = (order < total).astype(np.float32)
            # padding rows repeat the last example (whose cached features they then get)
            positions = np.where(mask > 0, order, total - 1)[mine]
            images = read(positions)  # ascending: padding only ever follows the last example
            yield {"image": images, "label": labels[positions], "mask": mask[mine],
                   "index": order[mine].astype(np.int32)}

    return generate()


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
    """Run ``iterator`` in a background thread, ``size`` items ahead (overlaps host
    preprocessing with device steps). Exceptions are re-raised in the consumer."""
    if size <= 0:
        yield from iterator
        return
    buffer: queue.Queue = queue.Queue(maxsize=size)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            for item in iterator:
                if stop.is_set():
                    return
                buffer.put(item)
            buffer.put(done)
        except BaseException as e:  # handed to the consumer, which re-raises it
            buffer.put(e)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full buffer
            try:
                buffer.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.01)
