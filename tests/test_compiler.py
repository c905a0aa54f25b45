"""pecft_jax.compiler: which XLA options programs compile with, and that they take effect."""
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest

from pecft_jax import compiler


def test_options_only_on_the_tested_jaxlib_and_never_over_the_users_flags():
    assert compiler.compiler_options("0.10.2", "") == {compiler.YNN_FUSIONS: ""}
    assert compiler.compiler_options("0.10.0rc1", "--xla_force_host_platform_device_count=8") \
        == {compiler.YNN_FUSIONS: ""}
    assert compiler.compiler_options("0.10.2.dev20251201", "") == {compiler.YNN_FUSIONS: ""}
    assert compiler.compiler_options("0.9.2", "") is None
    assert compiler.compiler_options("0.11.0", "") is None
    assert compiler.compiler_options(
        "0.10.2", f"--{compiler.YNN_FUSIONS}=+LIBRARY_FUSION_TYPE_REDUCE") is None


def _layer_norms(x, w, target):
    """Matmuls and the reductions of LayerNorm, forward and backward (what YNNPACK takes)."""
    def loss(w):
        h = x
        for _ in range(3):
            h = h @ w
            mean = h.mean(-1, keepdims=True)
            h = (h - mean) / jnp.sqrt(((h - mean) ** 2).mean(-1, keepdims=True) + 1e-6)
        return jnp.sum(h * target)
    return jax.value_and_grad(loss)(w)


# decided here, not by the function under test (a broken range would skip silently)
@pytest.mark.skipif(not jaxlib.__version__.startswith("0.10.")
                    or compiler.YNN_FUSIONS in os.environ.get("XLA_FLAGS", ""),
                    reason="the option is measured and applied on jaxlib 0.10.x only")
def test_the_option_reaches_xla_and_changes_no_result():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(96, 64)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(64, 64)) / 8, jnp.float32)
    target = jnp.asarray(rng.normal(size=(96, 64)), jnp.float32)
    default = jax.jit(_layer_norms).lower(x, w, target).compile()
    ours = compiler.jit(_layer_norms).lower(x, w, target).compile()
    assert "ynn" not in ours.as_text().lower()
    (loss_a, grad_a), (loss_b, grad_b) = default(x, w, target), ours(x, w, target)
    # the same sums in another order: float32 rounding of a sum of ~6,000 terms of size ~1
    np.testing.assert_allclose(float(loss_b), float(loss_a), atol=1e-3)
    scale = float(jnp.abs(grad_a).max())
    np.testing.assert_allclose(np.asarray(grad_b), np.asarray(grad_a), atol=1e-5 * scale)
    # XLA:CPU's default hands these reductions to YNNPACK (on the AMD EPYC VMs this project
    # runs on); a CPU where it does not leaves nothing for the option to switch off
    if "ynn" not in default.as_text().lower():
        pytest.skip("XLA:CPU used no YNNPACK fusion on this CPU: the option changed nothing")


# programs that run once a run and may compile without the options (file, what they run)
ONCE_A_RUN = {("backbones/backbone.py", "bert.init_params"),
              ("backbones/backbone.py", "vit.init_params"), ("train/loop.py", "self.method.init")}


def test_every_step_and_pass_of_the_library_compiles_through_compiler_jit():
    package = pathlib.Path(compiler.__file__).parent
    plain = set()
    for path in package.rglob("*.py"):
        if path.name == "compiler.py":
            continue
        # jax.jit(f ...), @jax.jit, partial(jax.jit, ...): what is jitted, or '' if unnamed
        for match in re.finditer(r"@jax\.jit\b|partial\(jax\.jit\b|jax\.jit\(([\w.]*)",
                                 path.read_text()):
            plain.add((path.relative_to(package).as_posix(), match.group(1) or ""))
    assert plain == ONCE_A_RUN, ("a jitted step or pass built with plain jax.jit misses the "
                                 f"library's XLA options: {sorted(plain - ONCE_A_RUN)}")
