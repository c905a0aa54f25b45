"""Pretrains the bundled demo backbone: ViT-Demo/7 supervised on Fashion-MNIST.

No pretrained ViT can be downloaded offline, so the demo experiments run on a small ViT this
script trains on real data (Fashion-MNIST, 60k train images, Debian package
``dataset-fashion-mnist``). The weights are committed as
``pecft_jax/assets/vit_demo7_fashion_mnist.safetensors`` (our own safetensors format, read
by ``load_pretrained``); the head is dropped, the continual methods bring their own.

    python experiments/pretrain_demo_backbone.py \
        --out pecft_jax/assets/vit_demo7_fashion_mnist.safetensors

Defaults: ViT-Demo/7 (28x28x1, patch 7, width 128, 6 blocks, 4 heads, MLP 256), AdamW
(lr 1e-3, weight decay 0.05, 1 warm-up epoch, cosine decay), batch 128, 10 epochs,
label smoothing 0.1, random crop (pad 2) + horizontal flip, seed 0.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pecft_jax.backbones import vit
from pecft_jax.backbones.pretrained import save_params
from pecft_jax.data import pipeline
from pecft_jax.data.sources import load_source


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="pecft_jax/assets/vit_demo7_fashion_mnist.safetensors")
    p.add_argument("--arch", default="ViT-Demo/7")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST idx dir (default: Debian's)")
    return p.parse_args()


def main():
    args = parse_args()
    train = load_source("fashion_mnist", "train", data_dir=args.data_dir)
    test = load_source("fashion_mnist", "test", data_dir=args.data_dir)
    cfg = vit.get_config(args.arch, num_classes=train.num_classes)
    params = vit.init_params(cfg, jax.random.key(args.seed))
    identity = np.arange(train.num_classes)
    steps_per_epoch = pipeline.steps_per_epoch(len(train), args.batch_size)
    total = steps_per_epoch * args.epochs
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, steps_per_epoch, total)
    optimizer = optax.adamw(schedule, weight_decay=args.weight_decay)
    opt_state = optimizer.init(params)
    augment = pipeline.Preprocess(image_size=28, channels=1, augment=True, crop_padding=2,
                                  flip=True)
    plain = pipeline.Preprocess(image_size=28, channels=1)

    @jax.jit
    def train_step(params, opt_state, images, labels):
        def loss_fn(p):
            logits = vit.apply(cfg, p, images)
            targets = optax.smooth_labels(jax.nn.one_hot(labels, cfg.num_classes),
                                          args.label_smoothing)
            return optax.softmax_cross_entropy(logits, targets).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def predict(params, images):
        return jnp.argmax(vit.apply(cfg, params, images), -1)

    def test_accuracy(params):
        correct = total_seen = 0
        for batch in pipeline.eval_batches(test, np.arange(len(test)), identity,
                                           batch_size=500, preprocess=plain):
            pred = np.asarray(predict(params, batch["inputs"]))
            keep = batch["mask"].astype(bool)
            correct += int((pred[keep] == batch["label"][keep]).sum())
            total_seen += int(keep.sum())
        return 100.0 * correct / total_seen

    started = time.time()
    for epoch in range(args.epochs):
        losses = []
        for batch in pipeline.train_batches(train, np.arange(len(train)), identity,
                                            batch_size=args.batch_size, seed=args.seed,
                                            epoch=epoch, preprocess=augment):
            params, opt_state, loss = train_step(params, opt_state, batch["inputs"],
                                                 batch["label"])
            losses.append(loss)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {float(np.mean(jax.device_get(losses))):.4f} "
              f"({time.time() - started:.0f}s)", flush=True)
    accuracy = test_accuracy(params)
    minutes = (time.time() - started) / 60
    print(f"Fashion-MNIST test accuracy: {accuracy:.2f}%  ({minutes:.1f} min)")
    backbone = {k: v for k, v in params.items() if k != "head"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    weights_fingerprint = save_params(args.out, cfg.replace(num_classes=0), backbone)
    # The file's sha256 also covers the safetensors header, whose metadata order is not
    # stable between writes; the weights fingerprint is what a re-run reproduces.
    digest = hashlib.sha256(open(args.out, "rb").read()).hexdigest()
    record = {"arch": args.arch, "epochs": args.epochs, "batch_size": args.batch_size,
              "lr": args.lr, "weight_decay": args.weight_decay, "seed": args.seed,
              "label_smoothing": args.label_smoothing,
              "fashion_mnist_test_accuracy": round(accuracy, 2), "minutes": round(minutes, 1),
              "sha256": digest, "weights_fingerprint": weights_fingerprint,
              "jax": jax.__version__, "devices": str(jax.devices())}
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
