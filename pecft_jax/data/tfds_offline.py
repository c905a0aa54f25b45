"""Writing a TFDS image dataset from images already in memory, without TensorFlow or a
download: a stock builder (e.g. TFDS's ``Cifar10``) whose examples come from given uint8
arrays, PNG-encoded as ``tfds build --file_format=array_record`` stores them. The records
are then read by :class:`~pecft_jax.data.sources.TFDSSource` exactly as a prepared stock
dataset is (the tests' real-records dataset and the input benchmark use it)."""
from __future__ import annotations

import io
from typing import Mapping, Tuple

import numpy as np


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 ``(H, W, C)`` or ``(H, W)`` -> PNG file bytes (lossless)."""
    from PIL import Image
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def prepare_from_arrays(builder_class: type, data_dir: str,
                        splits: Mapping[str, Tuple[np.ndarray, np.ndarray]]) -> str:
    """Prepares ``builder_class``'s dataset (name, features and version: a stock image
    classification builder with ``id``, ``image`` and ``label`` features, such as
    ``tensorflow_datasets.image_classification.cifar.Cifar10``) in ``data_dir`` from
    ``splits``: ``{split: (uint8 images (n, H, W, C), int labels (n,))}``; ``id`` is
    ``'<split>_<row>'``. Returns ``data_dir``. The registered builder is left as it is."""
    import tensorflow_datasets as tfds

    def examples(split):
        images, labels = splits[split]
        if len(images) != len(labels):
            raise ValueError(f"split {split!r}: {len(images)} images but {len(labels)} labels")
        for row, (image, label) in enumerate(zip(images, labels)):
            yield row, {"id": f"{split}_{row}", "image": png_bytes(image),
                        "label": int(label)}

    with tfds.core.registered.skip_registration():
        class FromArrays(builder_class):
            name = builder_class.name

            def _split_generators(self, dl_manager):
                return {split: examples(split) for split in splits}

    builder = FromArrays(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return data_dir
