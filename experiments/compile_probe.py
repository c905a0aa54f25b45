"""How long a small transformer's training step takes to trace, lower and compile, its blocks
unrolled or in a ``lax.scan``, and how fast the compiled step runs: the probe behind README "Speed",
"What was tried against the first-run compile".

    python experiments/compile_probe.py --layers unrolled
    python experiments/compile_probe.py --layers scan
    XLA_FLAGS=--xla_cpu_parallel_codegen_split_count=1 python experiments/compile_probe.py

The step is the gradient of a pre-norm transformer's [CLS] output with respect to an
additive prompt, the blocks frozen as in prompt tuning (``--grad all``: their weights too,
as in full fine-tuning), at the demo's shapes by default (ViT-Demo/7: six blocks of
width 128, four heads, MLP 256, 17 tokens, batch 64), compiled with pecft_jax's XLA options
(``pecft_jax.compiler``). Run each variant as its own process, alternating, and compare
medians: compile time in a process that already compiled something is not comparable.
"""
from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from pecft_jax import compiler


def layer_norm(x):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-6)


def block(p, x, heads):
    b, t, d = x.shape
    h = layer_norm(x)
    q, k, v = ((h @ p[name]).reshape(b, t, heads, d // heads) for name in ("wq", "wk", "wv"))
    attention = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d // heads), -1)
    x = x + jnp.einsum("bhts,bshd->bthd", attention, v).reshape(b, t, d) @ p["wo"]
    return x + jax.nn.gelu(layer_norm(x) @ p["w1"]) @ p["w2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", choices=("unrolled", "scan"), default="unrolled")
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=17)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--grad", choices=("prompt", "all"), default="prompt")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    d = args.width
    shapes = dict(wq=(d, d), wk=(d, d), wv=(d, d), wo=(d, d), w1=(d, 2 * d), w2=(2 * d, d))
    blocks = [{name: jnp.asarray(0.05 * rng.standard_normal(shape), jnp.float32)
               for name, shape in shapes.items()} for _ in range(args.depth)]
    x = jnp.asarray(rng.standard_normal((args.batch_size, args.tokens, d)), jnp.float32)
    prompt = jnp.zeros_like(x)

    def unrolled(prompt, weights, x):
        x = x + prompt
        for p in weights:
            x = block(p, x, args.heads)
        return jnp.sum(x[:, 0] ** 2)

    def scanned(prompt, weights, x):
        x, _ = jax.lax.scan(lambda x, p: (block(p, x, args.heads), None), x + prompt, weights)
        return jnp.sum(x[:, 0] ** 2)

    if args.layers == "unrolled":
        loss, weights = unrolled, blocks
    else:
        loss, weights = scanned, jax.tree_util.tree_map(lambda *w: jnp.stack(w), *blocks)
    step = compiler.jit(jax.grad(loss, argnums=0 if args.grad == "prompt" else (0, 1)))
    started = time.perf_counter()
    compiled = step.lower(prompt, weights, x).compile()
    compile_seconds = time.perf_counter() - started
    jax.block_until_ready(compiled(prompt, weights, x))
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        jax.block_until_ready(compiled(prompt, weights, x))
        times.append(time.perf_counter() - started)
    flags = os.environ.get("XLA_FLAGS", "")
    print(f"{args.layers}, gradient of {args.grad}: compile {compile_seconds:.3f} s, "
          f"step {1e3 * np.median(times):.2f} ms (median of {args.steps}); "
          f"XLA_FLAGS={flags!r}; load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
