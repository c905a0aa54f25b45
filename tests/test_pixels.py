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
from pecft_jax.data import ImageSource, Preprocess, pipeline, preprocess_images

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
    assert pixels.dtype == np.uint8 and pixels.shape == expected.shape
    backbone = Backbone(vit.get_config("ViT-Micro/4", image_size=12,
                                       num_channels=fields["channels"]),
                        float_pre.mean, float_pre.std)
    on_device = np.asarray(jax.jit(backbone.normalise)(pixels))
    np.testing.assert_array_equal(on_device, expected)  # bit for bit, not approximately


class VaryingSizes(ImageSource):
    """Images in their own sizes (as photos in a folder), ``image_shape`` None."""

    def __init__(self, images):
        self.images_list, self.name, self.split = images, "varying", "train"
        self.labels, self.num_classes, self.class_names = np.zeros(len(images), int), 1, ["0"]
        self.image_shape = None

    def _read(self, indices):
        return [self.images_list[i] for i in indices]


def test_a_source_of_varying_sizes_resized_while_read_gives_uint8_pixels():
    """The fixed-size path over a source that resizes its images to uint8 as it reads them
    (``ImageSource.images(size=)``): whole values, the same inputs."""
    source = VaryingSizes(RGB)
    float_pre = Preprocess(image_size=12, channels=3, **IMAGENET)
    assert not float_pre.reads_originals and float_pre.whole_pixels(source.image_shape)
    expected = pipeline.prepare_inputs(source, np.arange(2), float_pre)
    pixels = pipeline.prepare_inputs(source, np.arange(2),
                                     dataclasses.replace(float_pre, pixels="uint8"))
    backbone = Backbone(vit.get_config("ViT-Micro/4", image_size=12, num_channels=3),
                        float_pre.mean, float_pre.std)
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(backbone.normalise(pixels)), expected)


def test_grey_and_rgb_sources_give_batches_of_one_shape():
    """A run over grey and RGB datasets (5-datasets: MNIST beside CIFAR-10) streams their
    test sets in shared batches and compiles each program once: a grey source's uint8
    pixels are repeated to the model's channels on the host, as its float inputs are."""
    pre = Preprocess(image_size=12, channels=3, pixels="uint8", **IMAGENET)
    grey, rgb = (preprocess_images(x, pre) for x in (GREY_AT_SIZE, RGBA_AT_SIZE[..., :3]))
    assert grey.shape == rgb.shape == (2, 12, 12, 3) and grey.dtype == rgb.dtype == np.uint8
    assert pipeline.concat_inputs([grey, rgb]).shape == (4, 12, 12, 3)
    np.testing.assert_array_equal(grey, np.repeat(GREY_AT_SIZE, 3, axis=-1))


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
        run, _ = trainer.restore_or_init()  # the finished run's state
        logits = trainer.evaluate(run, len(trainer.tasks) - 1,
                                  predictions=True)["predictions"]["logits"]
    finally:
        trainer.close()
    monkeypatch.undo()
    # as results.json holds them
    return pixels, json.loads(json.dumps(results)), run.trainable, logits


@pytest.mark.slow
def test_a_run_on_uint8_pixels_gives_the_float_runs_results(tmp_path, monkeypatch):
    """The same trained parameters and test logits bit for bit (not only accuracies, which
    an ulp would rarely move)."""
    pixels, uint8_run, uint8_params, uint8_logits = _run(tmp_path, "uint8", monkeypatch)
    assert pixels == ("uint8", "uint8")
    pixels, float_run, float_params, float_logits = _run(tmp_path, "float", monkeypatch,
                                                         whole_pixels=False)
    assert pixels == ("float32", "float32")
    keys = [key for key in uint8_run if "matrix" in key]
    assert keys and all(uint8_run[key] == float_run[key] for key in keys)
    np.testing.assert_array_equal(uint8_logits, float_logits)
    leaves = jax.tree_util.tree_leaves_with_path(uint8_params)
    assert leaves and jax.tree_util.tree_structure(uint8_params) == \
        jax.tree_util.tree_structure(float_params)
    for (path, a), b in zip(leaves, jax.tree_util.tree_leaves(float_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
