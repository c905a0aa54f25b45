"""L2P training-step throughput: pecft_jax (jit) vs. an eager PyTorch implementation of
the same computation, side by side in one process on the same machine.

    python experiments/benchmark_l2p_step.py --arch ViT-Demo/7 --batch-size 64
    python experiments/benchmark_l2p_step.py --arch ViT-B/16 --batch-size 32   # on a GPU

The PyTorch side follows the structure of the reference L2P PyTorch code: a frozen ViT
computes the query without gradient, the top-k prompts are prepended, the prompted ViT
runs with gradients flowing to prompts/keys/head, Adam updates them. Both sides use float32
and the same shapes. PyTorch is not a dependency of the library: install it to run this
(``pip install torch``). Prints images/s for each and the ratio, with the command and the
machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import optax

from pecft_jax.backbones import vit
from pecft_jax.methods.base import TaskSpec
from pecft_jax.methods.l2p import L2P
from pecft_jax.backbones.backbone import Backbone
import ml_collections


def jax_step_time(cfg, batch, steps, pool, length, top_k):
    backbone = Backbone(cfg)
    frozen = vit.init_params(cfg, jax.random.key(0))
    method = L2P(ml_collections.ConfigDict(dict(pool_size=pool, prompt_length=length,
                                                top_k=top_k)), backbone, 100, 10)
    trainable, state = method.init(jax.random.key(1), frozen)
    task = TaskSpec(0, tuple(range(10)), tuple(range(10)), 100, 10,
                    tuple(tuple(range(10 * t, 10 * t + 10)) for t in range(10)))
    opt = optax.adam(1e-3)
    opt_state = opt.init(trainable)

    @jax.jit
    def step(trainable, state, opt_state, frozen, images, labels):
        def loss_fn(t):
            return method.loss(t, state, frozen, {"image": images, "label": labels}, None, task)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), aux["state"], opt_state, loss

    images = jax.random.normal(jax.random.key(2), (batch, cfg.image_size, cfg.image_size,
                                                   cfg.num_channels))
    labels = jnp.arange(batch) % 10
    trainable, state, opt_state, loss = step(trainable, state, opt_state, frozen, images, labels)
    loss.block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        trainable, state, opt_state, loss = step(trainable, state, opt_state, frozen, images,
                                                 labels)
    loss.block_until_ready()
    return (time.perf_counter() - start) / steps


def torch_step_time(cfg, batch, steps, pool, length, top_k, device):
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            d = cfg.hidden_size
            self.norm1, self.norm2 = tnn.LayerNorm(d, eps=1e-6), tnn.LayerNorm(d, eps=1e-6)
            self.qkv, self.proj = tnn.Linear(d, 3 * d), tnn.Linear(d, d)
            self.fc1, self.fc2 = tnn.Linear(d, cfg.mlp_dim), tnn.Linear(cfg.mlp_dim, d)

        def forward(self, x):
            b, n, d = x.shape
            h = cfg.num_heads
            q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, h, d // h).permute(2, 0, 3, 1, 4)
            att = F.scaled_dot_product_attention(q, k, v)
            x = x + self.proj(att.transpose(1, 2).reshape(b, n, d))
            return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))

    class ViT(tnn.Module):
        def __init__(self):
            super().__init__()
            d = cfg.hidden_size
            self.patch = tnn.Conv2d(cfg.num_channels, d, cfg.patch_size, cfg.patch_size)
            self.cls = tnn.Parameter(torch.zeros(1, 1, d))
            self.pos = tnn.Parameter(torch.randn(1, cfg.num_patches + 1, d) * 0.02)
            self.blocks = tnn.ModuleList(Block() for _ in range(cfg.num_layers))
            self.norm = tnn.LayerNorm(d, eps=1e-6)

        def forward(self, images, prompts=None):
            x = self.patch(images).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
            if prompts is not None:
                x = torch.cat([x[:, :1], prompts, x[:, 1:]], 1)
            for blk in self.blocks:
                x = blk(x)
            return self.norm(x)

    model = ViT().to(device).requires_grad_(False)
    d = cfg.hidden_size
    prompt = tnn.Parameter(torch.empty(pool, length, d, device=device).uniform_(-1, 1))
    keys = tnn.Parameter(torch.empty(pool, d, device=device).uniform_(-1, 1))
    head = tnn.Linear(d, 100).to(device)
    params = [prompt, keys, *head.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    images = torch.randn(batch, cfg.num_channels, cfg.image_size, cfg.image_size, device=device)
    labels = torch.arange(batch, device=device) % 10
    mask = torch.full((100,), float("-inf"), device=device)
    mask[:10] = 0

    def step():
        with torch.no_grad():
            query = model(images)[:, 0]
        sim = F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T
        idx = sim.topk(top_k, dim=1).indices
        selected = prompt[idx].reshape(batch, top_k * length, d)
        tokens = model(images, selected)
        logits = head(tokens[:, 1:1 + top_k * length].mean(1)) + mask
        pull = (1 - sim.gather(1, idx)).sum(1).mean()
        loss = F.cross_entropy(logits, labels) + 0.1 * pull
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    step()
    if device != "cpu":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="ViT-Demo/7")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pool", type=int, default=10)
    parser.add_argument("--length", type=int, default=5)
    parser.add_argument("--top-k", type=int, default=5)
    args = parser.parse_args()
    cfg = vit.get_config(args.arch)
    jax_s = jax_step_time(cfg, args.batch_size, args.steps, args.pool, args.length, args.top_k)
    try:
        import torch
    except ImportError:
        sys.exit("PyTorch is not installed: pip install torch (it is not a pecft_jax dependency)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_s = torch_step_time(cfg, args.batch_size, args.steps, args.pool, args.length,
                              args.top_k, device)
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, jax devices {jax.devices()}, "
          f"torch {torch.__version__} on {device}")
    print(f"L2P train step, {args.arch}, batch {args.batch_size}, pool {args.pool}x{args.length}, "
          f"top-{args.top_k}")
    print(f"  pecft_jax (jit):   {args.batch_size / jax_s:9.1f} images/s ({1e3 * jax_s:.1f} ms/step)")
    print(f"  PyTorch (eager):   {args.batch_size / torch_s:9.1f} images/s ({1e3 * torch_s:.1f} ms/step)")
    print(f"  speed-up: {torch_s / jax_s:.2f}x")


if __name__ == "__main__":
    main()
