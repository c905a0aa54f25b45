"""Side-by-side check of this library's PIL image transforms against torchvision's.

The PyTorch codes that the paper configs follow transform PIL images with torchvision:
``RandomResizedCrop`` + ``RandomHorizontalFlip`` (+ ``ColorJitter(brightness)``) for
training, ``Resize(256)`` + ``CenterCrop(224)`` (or ``Resize(224)``) for testing, then
``ToTensor()``. This script gives both sides the same random numbers -- torchvision gets
the crop box that ``pipeline.random_resized_box`` drew, the flips and the brightness
factors -- and prints the largest pixel difference (in 0..255 steps) per transform, on
real images (scikit-learn's digits, upscaled from 8 x 8 to 32 x 32 colour-mixed images,
and a mosaic of them of an ImageNet-R-like odd size) and random ones.

It needs torchvision, which pecft_jax does not depend on; e.g.::

    python -m venv /tmp/tv && /tmp/tv/bin/pip install torch torchvision pillow numpy scikit-learn
    PYTHONPATH=. /tmp/tv/bin/python experiments/check_transforms_torchvision.py

Exit status 1 when any difference is non-zero.
"""
from __future__ import annotations

import platform
import sys

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from pecft_jax.data import pipeline


def test_images(rng: np.random.Generator) -> list[np.ndarray]:
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
              rng.integers(0, 256, (375, 500, 3), dtype=np.uint8),
              rng.integers(0, 256, (40, 28, 1), dtype=np.uint8)]
    try:
        from sklearn.datasets import load_digits
        digits = (load_digits().images * (255 / 16)).astype(np.uint8)
        big = np.kron(digits[:12], np.ones((4, 4)))  # 12 x 32 x 32
        colour = np.stack([big[:4], big[4:8], big[8:]], axis=-1).astype(np.uint8)  # 4 RGB
        images += list(colour)
        images.append(np.concatenate([np.concatenate(list(colour), axis=1)] * 3)[:91, :123])
    except ImportError:
        print("scikit-learn not installed: random images only")
    return images


def torchvision_side(image: np.ndarray, preprocess: pipeline.Preprocess, box, flip,
                     factor) -> np.ndarray:
    mode = {"pil_bilinear": InterpolationMode.BILINEAR,
            "pil_bicubic": InterpolationMode.BICUBIC}[preprocess.resample]
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    size = preprocess.image_size
    if box is not None:
        top, left, h, w = box
        pil = F.resized_crop(pil, top, left, h, w, [size, size], mode)
    elif preprocess.resize_short is not None:
        pil = F.center_crop(F.resize(pil, preprocess.resize_short, mode), [size, size])
    else:
        pil = F.resize(pil, [size, size], mode)
    if flip:
        pil = F.hflip(pil)
    if factor is not None:
        pil = F.adjust_brightness(pil, factor)
    x = F.to_tensor(pil).permute(1, 2, 0).numpy() * 255  # ToTensor: x / 255
    return np.round(x).astype(np.float32)


def main() -> int:
    rng = np.random.default_rng(0)
    images = test_images(rng)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"{platform.processor() or platform.machine()}")
    worst = 0.0
    for resample in ("pil_bilinear", "pil_bicubic"):
        cases = {
            "RandomResizedCrop(224)+flip+ColorJitter": dict(augment=True, flip=True,
                                                           random_resized_crop=True,
                                                           brightness=63 / 255),
            "RandomResizedCrop(224, scale=(0.05,1))+flip": dict(augment=True, flip=True,
                                                                 random_resized_crop=True,
                                                                 crop_scale=(0.05, 1.0)),
            "Resize(256)+CenterCrop(224)": dict(resize_short=256),
            "Resize(224)": dict(),
        }
        for name, settings in cases.items():
            preprocess = pipeline.Preprocess(image_size=224, channels=3, mean=(0.0,),
                                             std=(1 / 255,), resample=resample, **settings)
            largest = 0.0
            for image in images:
                draws = rng.random((1, 10, 4)) if preprocess.random_resized_crop else None
                flip = bool(rng.random() < 0.5) if preprocess.flip else False
                factor = (float(np.float32(rng.uniform(1 - preprocess.brightness,
                                                       1 + preprocess.brightness)))
                          if preprocess.brightness else None)
                ours = pipeline.preprocess_images(
                    [image], preprocess, crops=None, flips=np.array([flip]), draws=draws,
                    brightness=None if factor is None else np.array([factor], np.float32))[0]
                box = (pipeline.random_resized_box(*image.shape[:2], draws[0],
                                                   preprocess.crop_scale, preprocess.crop_ratio)
                       if draws is not None else None)
                theirs = torchvision_side(image, preprocess, box, flip, factor)
                if image.shape[-1] == 1:
                    theirs = np.repeat(theirs, 3, axis=-1)
                largest = max(largest, float(np.abs(ours - theirs).max()))
            worst = max(worst, largest)
            print(f"{resample:13s} {name:45s} largest difference {largest:.4f} / 255 "
                  f"over {len(images)} images")
    print("identical" if worst == 0 else f"DIFFERENT: up to {worst} / 255")
    return 0 if worst == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
