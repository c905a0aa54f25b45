"""A *real* array_record TFDS dataset, built offline from real images (scikit-learn's
handwritten digits, 8 x 8 upscaled to CIFAR's 32 x 32 x 3 and PNG-encoded) through the
stock CIFAR-10 builder -- no mock: records written by TFDS, decoded by Pillow as on a user's
machine. Labels are read without decoding a single image, and a paper config runs end to
end on it with a random tiny ViT."""
import numpy as np
import pytest

from pecft_jax.data import load_source
from pecft_jax.data import sources as sources_lib
from pecft_jax.data import tfds_offline
from pecft_jax.train.loop import train_and_evaluate

from helpers import load_experiment_config

tfds = pytest.importorskip("tensorflow_datasets")
TRAIN = 1500  # of the 1,797 digits; the rest is the test split


def _digits():
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.kron((digits.images * (255 / 16)).astype(np.uint8), np.ones((4, 4), np.uint8))
    return np.repeat(images[..., None], 3, axis=-1), digits.target.astype(np.int64)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """TFDS's own CIFAR-10 builder, its download replaced by the digits (under
    skip_registration, so the registered builder stays the stock one): the records are
    PNG bytes, as `tfds build cifar10 --file_format=array_record` writes them."""
    from tensorflow_datasets.image_classification import cifar
    images, labels = _digits()
    root = str(tmp_path_factory.mktemp("tfds"))
    return tfds_offline.prepare_from_arrays(cifar.Cifar10, root, {
        "train": (images[:TRAIN], labels[:TRAIN]), "test": (images[TRAIN:], labels[TRAIN:])})


def test_a_real_dataset_reads_labels_without_decoding_images(data_dir, monkeypatch):
    images, labels = _digits()
    sources_lib._TFDS_LABEL_CACHE.clear()

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded to read the labels")

    with monkeypatch.context() as patch:
        patch.setattr(tfds.features.Image, "decode_example", no_decoding)
        train = load_source("tfds:cifar10", "train", data_dir=data_dir)
        test = load_source("tfds:cifar10", "test", data_dir=data_dir)
    assert len(train) == TRAIN and len(test) == len(labels) - TRAIN
    # the builder shuffles records: the labels follow the images they came with
    ids = np.array([int(r["id"].decode().split("_")[1]) if isinstance(r["id"], bytes)
                    else int(str(r["id"]).split("_")[1])
                    for r in tfds.data_source("cifar10", split="train", data_dir=data_dir)])
    np.testing.assert_array_equal(train.labels, labels[ids])
    picked = np.array([0, 17, 1499])
    np.testing.assert_array_equal(train.images(picked), images[ids[picked]])  # PNG lossless
    assert train.num_classes == 10 and train.image_shape == (32, 32, 3)


def test_a_paper_config_runs_end_to_end_on_it(data_dir, tmp_path):
    """l2p.py:cifar100 (the official protocol: squashed random-resized crops, centre-cropped
    tests, the official prompts and initialisations) on the real records: 5 tasks of the 10
    digits, a random ViT-Micro/4 reading 16 x 16 grey images."""
    c = load_experiment_config("l2p", "cifar100")
    c.dataset.name = "tfds:cifar10"
    c.dataset.data_dir = data_dir
    c.scenario.num_tasks = 5
    c.backbone.checkpoint = "random:ViT-Micro/4"
    c.backbone.image_size = 16
    c.backbone.mean, c.backbone.std = (0.0,), (1.0,)
    c.eval.resize_short = 20
    c.method.batchwise_group = 8
    c.train.epochs = 1
    c.train.batch_size = 32
    c.train.checkpoint_every_steps = 0
    c.eval.batch_size = 64
    c.progress_bar = False
    c.compilation_cache_dir = ""
    results = train_and_evaluate(c, str(tmp_path))
    assert [len(row) for row in results["accuracy_matrix"]] == [1, 2, 3, 4, 5]
    assert np.all(np.isfinite(results["accuracy_matrix"][-1]))
    assert results["class_order"] == list(range(10))
    assert results["dataset"] == "tfds:cifar10"
