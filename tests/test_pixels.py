"""uint8 pixels to the devices (``Preprocess.pixels='uint8'``, normalised by
``Backbone.apply``): which preprocessing keeps whole pixel values, and that the devices'
normalisation is the host's bit for bit -- per preprocessing path, through the ViT, and over
a whole continual run."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pecft_jax.backbones import vit
from pecft_jax.backbones.backbone import Backbone, load_backbone
from pecft_jax.data import Preprocess, pipeline, preprocess_images

from helpers import tiny_config

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
RNG = np.random.default_rng(0)
RGB = [RNG.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 52), (33, 30))]
GREY_AT_SIZE = RNG.integers(0, 256, (2, 12, 12, 1), dtype=np.uint8)
RGBA_AT_SIZE = RNG.integers(0, 256, (2, 12, 12, 4), dtype=np.uint8)


def augmentation(preprocess, n=2, seed=1):
    rng = np.random.default_rng(seed)
    crops = rng.integers(0, 2 * preprocess.crop_padding + 1, size=(n, 2))
    flips = np.array([True, False][:n])
    draws = rng.random((n, pipeline.CROP_ATTEMPTS[preprocess.crop_sampler], 4))
    brightness = rng.uniform(0.75, 1.25, size=n)
    return dict(crops=crops, flips=flips,
                draws=draws if preprocess.crops_training_images else None,
                brightness=brightness if preprocess.brightness else None)


# (name, Preprocess fields, images, their source's image_shape, whole pixel values?)
CASES = [
    ("at size, grey", dict(channels=1), GREY_AT_SIZE, (12, 12, 1), True),
    ("at size, grey to RGB", dict(channels=3, **IMAGENET), GREY_AT_SIZE, (12, 12, 1), True),
    ("at size, RGBA to RGB", dict(channels=3, **IMAGENET), RGBA_AT_SIZE, (12, 12, 4), True),
    ("at size, flip and padded crop", dict(channels=1, augment=True, flip=True, crop_padding=3),
     GREY_AT_SIZE, (12, 12, 1), True),
    ("at size, RGB to grey", dict(channels=1), RGBA_AT_SIZE[..., :3], (12, 12, 3), False),
    ("float bilinear resize", dict(channels=1), GREY_AT_SIZE[:, :10, :10], (10, 10, 1), False),
    ("float brightness", dict(channels=1, augment=True, brightness=0.25), GREY_AT_SIZE,
     (12, 12, 1), False),
    ("PIL resize", dict(channels=3, resample="pil_bicubic", **IMAGENET), RGB, None, True),
    ("PIL centre crop", dict(channels=3, resample="pil_bicubic", resize_short=14, **IMAGENET),
     RGB, None, True),
    ("float centre crop", dict(channels=3, resize_short=14, **IMAGENET), RGB, None, False),
    ("PIL random-resized crop, flip, brightness",
     dict(channels=3, augment=True, random_resized_crop=True, flip=True, brightness=0.25,
          resample="pil_bicubic", crop_resample="pil_bilinear", **IMAGENET), RGB, None, True),
    ("float random-resized crop", dict(channels=3, augment=True, random_resized_crop=True,
                                       resample="pil_bicubic", crop_resample="bilinear"),
     RGB, None, False),
    ("sizes vary, a grey model", dict(channels=1, resample="pil_bilinear"), RGB, None, False),
]


@pytest.mark.parametrize("name,fields,images,shape,whole", CASES, ids=[c[0] for c in CASES])
def test_uint8_pixels_normalised_on_the_device_equal_the_hosts_inputs(name, fields, images,
                                                                      shape, whole):
    float_pre = Preprocess(image_size=12, **fields)
    assert float_pre.whole_pixels(shape) == whole
    uint8_pre = dataclasses.replace(float_pre, pixels="uint8")
    aug = augmentation(float_pre) if float_pre.augments else {}
    expected = preprocess_images(images, float_pre, **aug)
    assert expected.dtype == np.float32
    if not whole:  # a float step on the way: never rounded to uint8 unnoticed
        with pytest.raises(ValueError, match="pixels='float32'"):
            preprocess_images(images, uint8_pre, **aug)
        return
    pixels = preprocess_images(images, uint8_pre, **aug)
    assert pixels.dtype == np.uint8 and pixels.shape[:3] == expected.shape[:3]
    backbone = Backbone(vit.get_config("ViT-Micro/4", image_size=12,
                                       num_channels=fields["channels"]),
                        float_pre.mean, float_pre.std)
    on_device = np.asarray(jax.jit(backbone.normalise)(pixels))
    np.testing.assert_array_equal(on_device, expected)  # bit for bit, not approximately


def test_the_pixel_table_holds_the_hosts_normalisation():
    """A lookup, not ``x * scale - shift`` on the device: XLA:CPU's program for that was off
    by an ulp on some values (jaxlib 0.10.2; checked ad hoc), the table holds the host's own
    float32 results."""
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)
    host = preprocess_images(x, Preprocess(image_size=16, channels=3, **IMAGENET))
    table = pipeline.pixel_table(IMAGENET["mean"], IMAGENET["std"])
    np.testing.assert_array_equal(table[x[..., :1], np.arange(3)], host)
    scale, shift = pipeline.normalisation(IMAGENET["mean"], IMAGENET["std"])
    np.testing.assert_allclose(table, np.arange(256)[:, None] / 255.0 * 1 / np.asarray(
        IMAGENET["std"]) - np.asarray(IMAGENET["mean"]) / np.asarray(IMAGENET["std"]),
        rtol=1e-6, atol=1e-6)
    assert scale.dtype == shift.dtype == np.float32


def test_the_vit_on_uint8_pixels_equals_it_on_the_hosts_float_inputs():
    backbone, frozen = load_backbone("random:ViT-Micro/4", mean=(0.3,), std=(0.4,))
    pixels = RNG.integers(0, 256, (4, 16, 16, 1), dtype=np.uint8)
    host = preprocess_images(pixels, Preprocess(image_size=16, channels=1, mean=(0.3,),
                                                std=(0.4,)))
    apply = jax.jit(lambda p, x: backbone.apply(p, x, output="cls"))
    np.testing.assert_array_equal(np.asarray(apply(frozen, pixels)),
                                  np.asarray(apply(frozen, host)))
    # and the gradient path of a method sees the same inputs
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(backbone.apply(p, x, output="cls") ** 2)))
    for a, b in zip(jax.tree_util.tree_leaves(grad(frozen, pixels)),
                    jax.tree_util.tree_leaves(grad(frozen, host))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _run(tmp_path, name, monkeypatch, whole_pixels=None):
    from pecft_jax.train.loop import ContinualTrainer
    config = tiny_config()
    config.scenario.num_tasks = 2
    config.dataset.resample = "pil_bilinear"  # digits' 8 px to ViT-Micro's 16 by PIL: uint8
    config.augment.enabled = True
    config.augment.flip = True
    if whole_pixels is not None:
        monkeypatch.setattr(Preprocess, "whole_pixels", lambda self, shape: whole_pixels)
    trainer = ContinualTrainer(config, str(tmp_path / name))
    try:
        pixels = (trainer.train_preprocess.pixels, trainer.eval_preprocess.pixels)
        results = trainer.run()
    finally:
        trainer.close()
    monkeypatch.undo()
    return pixels, json.loads(json.dumps(results))  # as results.json holds them


def test_a_run_on_uint8_pixels_gives_the_float_runs_results(tmp_path, monkeypatch):
    pixels, uint8_run = _run(tmp_path, "uint8", monkeypatch)
    assert pixels == ("uint8", "uint8")
    pixels, float_run = _run(tmp_path, "float", monkeypatch, whole_pixels=False)
    assert pixels == ("float32", "float32")
    keys = [key for key in uint8_run if "matrix" in key]
    assert keys and all(uint8_run[key] == float_run[key] for key in keys)
    assert uint8_run["metrics"] == float_run["metrics"]
