"""Host input pipeline throughput: images/s of reading, decoding and augmenting training
batches at 224 px, in one thread (what the loop's single prefetch thread did before the
pipeline moved to grain) against grain's reading threads and worker processes.

    python experiments/benchmark_input.py                      # all workloads, 3 rounds
    python experiments/benchmark_input.py --workloads folder-jpeg --variants t0,t2,p2 --rounds 5

Workloads (real images, prepared once under ``--data-dir``, nothing downloaded):

* ``tfds-cifar``: a real array_record TFDS dataset written through TFDS's stock CIFAR-10
  builder (``pecft_jax.data.tfds_offline``) from scikit-learn's 1,797 handwritten digits,
  upscaled to CIFAR's 32 x 32 x 3 and PNG-encoded; the official L2P / DualPrompt transform
  (squash to 256, random-resized crop to 224, flip), as ``l2p.py:cifar100`` sets it.
* ``folder-jpeg``: an image folder (``dataset.name='folder'``, as ImageNet-R is
  distributed) of 1,200 JPEGs cut from scikit-learn's two real photographs at ImageNet-R's
  sizes (short side 200-500 px); the PyTorch codes' transform (PIL-bilinear
  random-resized crop to 224, flip), as ``dualprompt.py:imagenet_r`` sets it.

Variants: ``t0`` reads in the consuming thread (the previous pipeline's work per batch:
the loop ran it in one background thread); ``tN``: grain with N reading threads; ``pN``:
grain with N worker processes of 1 thread each (their start is included: the loop starts
them once per task). The batches hold what the loop would hand the devices: uint8 pixels
where the transform keeps whole pixel values (``Preprocess.whole_pixels``: the folder
workload's PIL transform), normalised float32 otherwise (the TFDS workload's float crops); a
variant ending in ``f`` (``t2f``, ``p2f``) always makes normalised float32, as the pipeline
did before the uint8 pixels.

Protocol: every round starts one fresh process per variant, in turn (t0, t2, p2, t0, ...),
so load from other jobs hits all alike. Each process reads ``--batches`` batches of
``--batch-size`` after one warm-up batch and reports wall time and its CPU time (all
threads and worker processes). Reported: the median over rounds of images/s, the spread,
CPU seconds per batch, the load average, the machine, and the ratio to ``t0``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = ("tfds-cifar", "folder-jpeg")


# ============================================================================= data
def prepare_tfds(data_dir: str) -> str:
    from sklearn.datasets import load_digits
    import numpy as np
    from tensorflow_datasets.image_classification import cifar
    from pecft_jax.data import tfds_offline
    root = os.path.join(data_dir, "tfds")
    if os.path.isdir(os.path.join(root, "cifar10")):
        return root
    digits = load_digits()
    images = np.kron((digits.images * (255 / 16)).astype(np.uint8), np.ones((4, 4), np.uint8))
    images = np.repeat(images[..., None], 3, axis=-1)
    labels = digits.target
    return tfds_offline.prepare_from_arrays(cifar.Cifar10, root, {
        "train": (images[:1500], labels[:1500]), "test": (images[1500:], labels[1500:])})


def prepare_folder(data_dir: str, count: int = 1200, classes: int = 10) -> str:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images
    root = os.path.join(data_dir, "folder")
    if os.path.isdir(root):
        return root
    photos = load_sample_images().images  # two real 427 x 640 RGB photographs
    rng = np.random.default_rng(0)
    for i in range(count):
        photo = photos[i % 2]
        h = int(rng.integers(150, 427))
        w = int(rng.integers(150, 640))
        top, left = int(rng.integers(0, 428 - h)), int(rng.integers(0, 641 - w))
        crop = Image.fromarray(photo[top:top + h, left:left + w])
        short = int(rng.integers(200, 500))  # ImageNet-R's images: short side mostly 200-500
        scale = short / min(h, w)
        crop = crop.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                           Image.BILINEAR)
        folder = os.path.join(root, "train", f"class_{i % classes:02d}")
        os.makedirs(folder, exist_ok=True)
        crop.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    return root


def workload(name: str, data_dir: str):
    """``(source, Preprocess)`` of a workload."""
    from pecft_jax.data import Preprocess, load_source
    if name == "tfds-cifar":
        source = load_source("tfds:cifar10", "train", data_dir=prepare_tfds(data_dir))
        preprocess = Preprocess(image_size=224, channels=3, augment=True, flip=True,
                                random_resized_crop=True, resize_short=256, squash=True)
    elif name == "folder-jpeg":
        source = load_source("folder", "train", data_dir=prepare_folder(data_dir))
        preprocess = Preprocess(image_size=224, channels=3, augment=True, flip=True,
                                random_resized_crop=True, resample="pil_bilinear")
    else:
        raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")
    if preprocess.whole_pixels(source.image_shape):  # as the loop chooses
        preprocess = dataclasses.replace(preprocess, pixels="uint8")
    return source, preprocess


# ============================================================================= one process
def measure(workload_name: str, variant: str, data_dir: str, batch_size: int,
            batches: int) -> dict:
    import numpy as np
    from pecft_jax.data import loader, pipeline
    source, preprocess = workload(workload_name, data_dir)
    if variant.endswith("f"):
        preprocess, variant = dataclasses.replace(preprocess, pixels="float32"), variant[:-1]
    label_map = np.arange(source.num_classes)
    sequence = pipeline.TrainBatches(source, np.arange(len(source)), label_map,
                                     batch_size=batch_size, seed=0, preprocess=preprocess,
                                     epochs=batches // max(1, len(source) // batch_size) + 2)
    kind, count = variant[0], int(variant[1:])
    options = loader.ReadOptions(threads=count if kind == "t" else 1,
                                 processes=count if kind == "p" else 0, prefetch=2)
    cpu0, wall0 = _cpu_seconds(), time.perf_counter()
    if kind == "t" and count == 0:
        iterator = (sequence[i] for i in range(len(sequence)))
    else:
        iterator = loader.read(sequence, options)
    next(iterator)  # warm-up (and the workers' start)
    start_cpu, start = _cpu_seconds(), time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        assert batch["inputs"].shape == (batch_size, 224, 224, 3)
        assert batch["inputs"].dtype == np.dtype(preprocess.pixels)
    wall = time.perf_counter() - start
    cpu = _cpu_seconds() - start_cpu
    loader.close(iterator)
    return {"images_per_sec": batch_size * batches / wall, "cpu_per_batch": cpu / batches,
            "first_batch_s": start - wall0, "first_cpu_s": start_cpu - cpu0}


def _cpu_seconds() -> float:
    """CPU seconds of this process and its live child processes (grain's workers), from
    /proc (Linux); falls back to this process alone."""
    me, total = os.getpid(), 0.0
    tick = os.sysconf("SC_CLK_TCK")
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return time.process_time()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(pid) == me or int(fields[1]) == me:  # fields[1]: the parent's pid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


# ============================================================================= driver
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--variants", default="t0,t1,t2,p2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--data-dir", default=os.path.join(ROOT, "workdirs", "input_bench"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        name, variant = args.worker.split(":")
        print(json.dumps(measure(name, variant, args.data_dir, args.batch_size, args.batches)))
        return

    variants = args.variants.split(",")
    for variant in variants:
        count = variant[1:-1] if variant.endswith("f") else variant[1:]
        if variant[:1] not in "tp" or not count.isdigit() or variant.rstrip("f") == "p0":
            parser.error(f"variant {variant!r}: use tN (N reading threads, t0 = none) or pN "
                         f"(N >= 1 worker processes), with a trailing f for float32 inputs")
    for name in args.workloads.split(","):
        workload(name, args.data_dir)  # prepare once, outside the timed processes
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"command: {' '.join(sys.argv)}")
    for name in args.workloads.split(","):
        results = {v: [] for v in variants}
        loads = []
        for _ in range(args.rounds):
            for variant in variants:
                load = os.getloadavg()[0]
                command = [sys.executable, os.path.abspath(__file__), "--worker",
                           f"{name}:{variant}", "--data-dir", args.data_dir,
                           "--batch-size", str(args.batch_size), "--batches", str(args.batches)]
                done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
                if done.returncode:
                    sys.exit(f"{name}:{variant} failed:\n{done.stderr[-3000:]}")
                results[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
                loads.append((load, os.getloadavg()[0]))
        print(f"\n{name}: batch {args.batch_size}, {args.batches} batches per process, "
              f"{args.rounds} rounds; load average {min(min(l) for l in loads):.2f}-"
              f"{max(max(l) for l in loads):.2f}")
        base = statistics.median(r["images_per_sec"] for r in results[variants[0]])
        print(f"  {'variant':8s} {'images/s':>9s} {'(min-max)':>15s} {'CPU s/batch':>12s} "
              f"{'start s':>8s} {'vs ' + variants[0]:>8s}")
        for variant in variants:
            rates = [r["images_per_sec"] for r in results[variant]]
            median = statistics.median(rates)
            print(f"  {variant:8s} {median:9.1f} {min(rates):7.1f}-{max(rates):<7.1f} "
                  f"{statistics.median(r['cpu_per_batch'] for r in results[variant]):12.2f} "
                  f"{statistics.median(r['first_batch_s'] for r in results[variant]):8.2f} "
                  f"{median / base:7.2f}x")


if __name__ == "__main__":
    main()
