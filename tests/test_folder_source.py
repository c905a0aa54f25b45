"""The image-folder source (``dataset.name='folder'``): ImageFolder's class and file order,
split folders or a seeded split, Pillow decoding to RGB, clear errors, and a run on it."""
import os

import numpy as np
import pytest
from PIL import Image

from pecft_jax.data import load_source
from pecft_jax.train.loop import train_and_evaluate

from helpers import tiny_config

# folder name -> digit; sorted, the class ids are a_one=0, b_two=1, c_three=2, d_nine=3
CLASSES = {"b_two": 2, "a_one": 1, "d_nine": 9, "c_three": 3}


def _digit_images(digit, count, rng):
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = (digits.images[digits.target == digit][:count] * (255 / 16)).astype(np.uint8)
    # photos come in their own sizes: each upscaled by its own factor
    return [np.kron(im, np.ones((k, k), np.uint8)) for im, k in
            zip(images, rng.integers(2, 5, size=len(images)))]


def _write_tree(root, per_class=12, splits=("train", "test")):
    """``root/<split>/<class>/`` (or ``root/<class>/`` without splits) with grey and RGB
    PNGs, a nested folder, an upper-case extension and a file that is not an image.
    Returns {split: [(relative path, class id, pixels)] in the order ImageFolder lists}."""
    rng = np.random.default_rng(0)
    expected = {}
    for split in splits or (None,):
        rows = []
        for cid, folder in enumerate(sorted(CLASSES)):
            base = os.path.join(root, split, folder) if split else os.path.join(root, folder)
            os.makedirs(os.path.join(base, "more"), exist_ok=True)
            open(os.path.join(base, "notes.txt"), "w").write("not an image")
            entries = []
            for i, grey in enumerate(_digit_images(CLASSES[folder], per_class, rng)):
                pixels = grey if i % 2 else np.repeat(grey[..., None], 3, -1)  # L and RGB files
                sub = "more" if i % 3 == 0 else ""
                name = f"img{i:02d}" + (".PNG" if i % 4 == 1 else ".png")
                Image.fromarray(pixels).save(os.path.join(base, sub, name), format="PNG")
                entries.append((os.path.join(folder, sub, name), cid, grey))
            # ImageFolder: sorted(os.walk) -> the class folder's own files first, then 'more'
            entries.sort(key=lambda e: (os.path.dirname(e[0]), os.path.basename(e[0])))
            rows += entries
        expected[split] = rows
    return expected


def test_split_folders_give_imagefolders_order_and_rgb_pixels(tmp_path):
    expected = _write_tree(str(tmp_path))
    for split in ("train", "test"):
        source = load_source("folder", split, data_dir=str(tmp_path))
        assert source.class_names == sorted(CLASSES) and source.image_shape is None
        rel = [os.path.relpath(p, os.path.join(tmp_path, split)) for p in source.paths]
        assert rel == [e[0] for e in expected[split]]  # no notes.txt, nested files included
        np.testing.assert_array_equal(source.labels, [e[1] for e in expected[split]])
        picked = np.array([0, 5, len(rel) - 1])
        for got, i in zip(source.raw_images(picked), picked):
            grey = expected[split][i][2]
            np.testing.assert_array_equal(got, np.repeat(grey[..., None], 3, -1))  # RGB
        resized = source.images(picked, size=16)
        assert resized.shape == (3, 16, 16, 3) and resized.dtype == np.uint8


def test_a_flat_folder_is_split_once_stratified_and_seeded(tmp_path):
    _write_tree(str(tmp_path), splits=None)
    train = load_source("folder", "train", data_dir=str(tmp_path))
    test = load_source("folder", "test", data_dir=str(tmp_path))
    every = load_source("folder", "all", data_dir=str(tmp_path))
    assert len(every) == 4 * 12 and sorted(train.paths + test.paths) == sorted(every.paths)
    assert not set(train.paths) & set(test.paths)
    assert np.bincount(test.labels).tolist() == [round(0.2 * 12)] * 4  # per class
    again = load_source("folder", "test", data_dir=str(tmp_path))
    assert again.paths == test.paths
    other = load_source("folder", "test", data_dir=str(tmp_path), seed=5)
    assert other.paths != test.paths


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="needs dataset.data_dir"):
        load_source("folder", "train", data_dir=str(tmp_path / "missing"))
    _write_tree(str(tmp_path), per_class=3)
    with pytest.raises(ValueError, match=r"split folders \['test', 'train'\], not 'val'"):
        load_source("folder", "val", data_dir=str(tmp_path))
    os.makedirs(tmp_path / "train" / "e_empty")
    with pytest.raises(FileNotFoundError, match="e_empty holds no image file"):
        load_source("folder", "train", data_dir=str(tmp_path))
    os.rmdir(tmp_path / "train" / "e_empty")
    broken = tmp_path / "test" / "a_one" / "broken.png"
    broken.write_bytes(b"not a png")
    source = load_source("folder", "test", data_dir=str(tmp_path))
    index = source.paths.index(str(broken))
    with pytest.raises(ValueError, match=r"broken\.png cannot be read"):
        source.raw_images(np.array([index]))


def test_a_run_on_image_folders(tmp_path):
    _write_tree(str(tmp_path / "data"), per_class=40)
    c = tiny_config()
    c.dataset.name = "folder"
    c.dataset.data_dir = str(tmp_path / "data")
    c.scenario.num_tasks = 2
    c.scenario.class_order = "identity"
    c.train.checkpoint_every_steps = 0
    results = train_and_evaluate(c, str(tmp_path / "run"))
    assert [len(r) for r in results["accuracy_matrix"]] == [1, 2]
    assert results["class_order"] == [0, 1, 2, 3]
