"""InfLoRA, SD-LoRA and O-LoRA against independent computations: the designed
down-projection orthogonal to the protected subspace and the DualGPM dimensions from
numpy's eigen-decomposition, updates that cannot reach the old inputs, SD-LoRA's
magnitude/direction update against numpy and its frozen directions, O-LoRA's losses against
numpy and its frozen old LoRAs, the stacked task LoRAs as a sum of single ones, and the
paper configurations' sizes."""
import dataclasses
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pecft_jax.backbones import bert, vit
from pecft_jax.backbones.backbone import Backbone, TextBackbone, load_backbone
from pecft_jax.methods import create_method
from pecft_jax.methods.inflora import (design_down_projection, gpm_threshold,
                                       update_dual_gpm)
from pecft_jax.methods.o_lora import l2_loss, orthogonality_loss
from pecft_jax.methods.sd_lora import direction_weights
from pecft_jax.methods.base import apply_linear_head
from pecft_jax.peft.lora import (LoraConfig, fold_task_loras, folds_exactly, init_lora,
                                 init_task_loras, lora_context, merge_lora, product_norms,
                                 task_lora_context)
from pecft_jax.train.loop import train_and_evaluate

from helpers import array_task_data, task_checkpoints, task_spec, tiny_config


def _moments(rng, dim, rank, n=400, scale=None):
    """Second moments of n low-rank-plus-noise inputs (a realistic decaying spectrum)."""
    basis = np.linalg.qr(rng.normal(size=(dim, rank)))[0]
    scale = np.geomspace(10, 1, rank) if scale is None else scale
    x = (rng.normal(size=(n, rank)) * scale) @ basis.T + 0.05 * rng.normal(size=(n, dim))
    return x.T @ x


def _kept(eigenvalues, threshold):
    """How many leading directions the official criterion keeps: cumulative energy of the
    *squared* eigenvalues below the threshold."""
    energy = np.sort(eigenvalues)[::-1] ** 2
    return int(np.sum(np.cumsum(energy) / energy.sum() < threshold))


# ----------------------------------------------------------------------------- InfLoRA
def test_dual_gpm_dimensions_and_designed_projection_follow_numpy():
    rng = np.random.default_rng(0)
    dim, rank = 24, 4
    c0 = _moments(rng, dim, 6)
    basis, retain = update_dual_gpm(c0, np.zeros((dim, 0)), False, 0.95)
    want = _kept(np.linalg.eigvalsh(c0), 0.95)
    assert not retain and basis.shape == (dim, max(want, 1))
    np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-10)
    # the designed A of the next task lies in the orthogonal complement of the basis, and
    # its columns are orthonormal / sqrt(3) (official inflora.py)
    c1 = _moments(rng, dim, 6)
    a = design_down_projection(c1, basis, False, rank)
    assert a.shape == (dim, rank)
    np.testing.assert_allclose(basis.T @ a, 0, atol=1e-10)
    np.testing.assert_allclose(a.T @ a, np.eye(rank) / 3, atol=1e-10)
    # ... and they are the top left singular vectors of (I - M M^T) C (one-sided, as the code)
    u = np.linalg.svd(c1 - basis @ basis.T @ c1)[0][:, :rank]
    np.testing.assert_allclose(np.abs(u.T @ a * np.sqrt(3)), np.eye(rank), atol=1e-8)
    # the basis grows by the directions numpy's eigen-decomposition of the projected
    # moments needs to bring the protected energy (of squared eigenvalues) to the threshold
    grown, retain = update_dual_gpm(c1, basis, False, 0.97)
    total = np.sum(np.linalg.eigvalsh(c1) ** 2)
    u, s, _ = np.linalg.svd(c1 - basis @ basis.T @ c1)
    acc, added = (total - np.sum(s ** 2)) / total, 0
    while acc < 0.97:
        acc += s[added] ** 2 / total
        added += 1
    assert grown.shape[1] == basis.shape[1] + added and not retain
    np.testing.assert_array_equal(grown[:, :basis.shape[1]], basis)


def test_dual_gpm_switches_to_the_complement_past_half_the_width():
    rng = np.random.default_rng(1)
    dim = 16
    wide = _moments(rng, dim, 12, scale=np.ones(12))  # flat spectrum: many directions kept
    basis, retain = update_dual_gpm(wide, np.zeros((dim, 0)), False, 0.999)
    assert retain and basis.shape[1] == dim - _kept(np.linalg.eigvalsh(wide), 0.999)
    # the stored complement is orthogonal to the kept (top) directions (a fix: the official
    # first-task 'retain' branch stores the kept ones and then fails an assertion)
    top = np.linalg.svd(wide)[0][:, :dim - basis.shape[1]]
    np.testing.assert_allclose(top.T @ basis, 0, atol=1e-8)
    a = design_down_projection(_moments(rng, dim, 4), basis, True, 2)
    np.testing.assert_allclose(top.T @ a, 0, atol=1e-8)  # still outside the protected space
    assert gpm_threshold(0.95, 1.0, 9, 10) == pytest.approx(0.995)


def test_inflora_updates_never_reach_the_old_tasks_inputs():
    """Through the loop: task 1's trained update A_1 B_1 maps every direction of the
    protected input subspace of task 0 to (numerically) zero; task 0's branch and head stay
    bit-identical; the designed A_1 is orthogonal to the stored basis."""
    workdir = tempfile.mkdtemp()
    c = tiny_config("inflora", rank=2, lamb=0.9)
    c.scenario.num_tasks = 2
    results = train_and_evaluate(c, workdir)
    assert results["compilation"]["traces"] == {"train_step": 1, "eval_step": 1}
    first, second = task_checkpoints(workdir, (0, 1))
    for layer, targets in second["trainable"]["lora"].items():
        width = int(first["state"]["basis_width"][int(layer)])
        assert not first["state"]["retain"][int(layer)]
        basis = np.asarray(first["state"]["basis"][int(layer)])[:, :width]
        for target, f in targets.items():
            a1, b1 = np.asarray(f["A"][1], np.float64), np.asarray(f["B"][1], np.float64)
            assert np.abs(b1).max() > 0  # trained
            np.testing.assert_allclose(basis.T @ a1, 0, atol=1e-5)
            update = a1 @ b1  # (d_in, d_out): x -> x A B
            assert np.abs(basis.T @ update).max() < 1e-5 * np.abs(update).max()
            old = first["trainable"]["lora"][layer][target]
            np.testing.assert_array_equal(f["A"][0], old["A"][0])
            np.testing.assert_array_equal(f["B"][0], old["B"][0])
        np.testing.assert_array_equal(targets["key"]["A"][1], targets["value"]["A"][1])
    head0, head1 = first["trainable"]["head"], second["trainable"]["head"]
    np.testing.assert_array_equal(head1["kernel"][:, :5], head0["kernel"][:, :5])


def test_inflora_input_moments_skip_a_text_encoders_padding_tokens():
    """On a BERT encoder, each sentence adds the ``x x^T`` of its real tokens only: the sum
    equals that of each sentence run alone at its own length (no padding at all), whatever
    the padding tokens are, and a padding row of the batch adds nothing."""
    cfg = bert.get_config("BERT-Micro")
    backbone = TextBackbone(cfg, tokenizer_path="", max_length=8)
    method = create_method("inflora", {"rank": 2}, backbone, 4, 2)
    frozen = bert.init_params(cfg, jax.random.key(0))
    trainable, _ = method.init(jax.random.key(1), frozen)
    rng = np.random.default_rng(0)
    lengths = np.array([8, 5, 3])
    ids = rng.integers(1, cfg.vocab_size, size=(3, 8)).astype(np.int32)
    attention = (np.arange(8)[None] < lengths[:, None]).astype(np.int32)
    zeros = jnp.zeros((cfg.num_layers, cfg.hidden_size, cfg.hidden_size), jnp.float32)

    def moments(token_ids):
        batch = {"inputs": {"token_ids": token_ids, "attention_mask": attention},
                 "mask": np.array([1, 1, 0], np.float32)}  # the third row pads the batch
        return np.asarray(method.input_moments(zeros, batch, trainable, frozen))

    want = np.zeros(zeros.shape)
    for i in (0, 1):  # alone and unpadded: the real tokens' inputs, nothing else
        n = lengths[i]
        blocks = bert.apply(cfg, frozen, ids[i:i + 1, :n], np.ones((1, n), np.int32),
                            output="features")["blocks"]
        for layer, block in enumerate(blocks):
            x = np.asarray(block["attn_input"][0], np.float64)
            want[layer] += x.T @ x
    got = moments(ids)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    other = np.where(attention == 1, ids, (ids + 7) % cfg.vocab_size)  # new padding tokens
    np.testing.assert_allclose(moments(other), got, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("on_augmented", [True, False])
def test_inflora_passes_read_a_fresh_augmentation_before_and_after_the_task(on_augmented):
    """The official ``_train`` loops over its augmented ``train_loader`` to design ``A_t``
    and again, after the epochs, for DualGPM: ``before_task`` reads augmented view 0,
    ``after_task`` view 1 -- their moments, computed here from those images, design the
    projections and grow the basis. ``moments_on_augmented=False``: the plain images."""
    cfg = vit.get_config("ViT-Micro/4", num_classes=0)
    backbone = Backbone(cfg)
    frozen = vit.init_params(cfg, jax.random.key(0))
    method = create_method("inflora", {"rank": 2, "moments_on_augmented": on_augmented},
                           backbone, 4, 2)
    trainable, state = method.init(jax.random.key(1), frozen)
    rng = np.random.default_rng(2)
    images = rng.uniform(-1, 1, (12, 16, 16, 1)).astype(np.float32)
    labels = np.repeat([0, 1], 6)
    view = lambda e: np.roll(images, 3 * e + 2, axis=1)  # a stand-in for random crops
    seen = []
    data = array_task_data(images, labels, augmented=lambda e: (seen.append(e), view(e))[1])
    spec = task_spec(0, [[0, 1], [2, 3]], 4)

    def moments(pixels, trainable):  # sum over images and tokens of x x^T, per block
        blocks = method.features(trainable, frozen, pixels, output="features")["blocks"]
        return [np.einsum("bnd,bne->de", *(np.asarray(b["attn_input"], np.float64),) * 2)
                for b in blocks]

    after_before, state = method.before_task(spec, trainable, state, frozen, data,
                                             jax.random.key(3))
    before_images = view(0) if on_augmented else images
    for l, c in enumerate(moments(before_images, trainable)):
        want = design_down_projection(c.astype(np.float32), np.zeros((c.shape[0], 0)), False, 2)
        got = np.asarray(after_before["lora"][str(l)]["key"]["A"][0])
        # singular vectors up to sign
        np.testing.assert_allclose(np.abs(got), np.abs(want), rtol=1e-3, atol=1e-4)
    _, new_state = method.after_task(spec, after_before, state, frozen, data, jax.random.key(4))
    assert seen == ([0, 1] if on_augmented else [])
    after_images = view(1) if on_augmented else images
    threshold = gpm_threshold(0.95, 1.0, 0, 2)
    for l, c in enumerate(moments(after_images, after_before)):
        basis, retain = update_dual_gpm(c.astype(np.float32), np.zeros((c.shape[0], 0)), False,
                                        threshold)
        assert int(new_state["basis_width"][l]) == basis.shape[1]
        assert bool(new_state["retain"][l]) == retain


def _record_lora_ranks(monkeypatch) -> list:
    """Makes every backbone pass append the sorted LoRA ranks of its context (``[]``: no
    branch) to the list returned."""
    widths = []
    apply = Backbone.apply

    def spy(self, params, images, peft=None, **kw):
        widths.append(sorted({f["B"].shape[0] for lp in (peft.layers if peft else {}).values()
                              for f in lp.lora.values()}))
        return apply(self, params, images, peft, **kw)
    monkeypatch.setattr(Backbone, "apply", spy)
    return widths


def _loss_beside_unfolded(method, trainable, frozen, batch, spec, unfolded):
    """``(loss, grads, want, want_grads)``: the method's loss and gradients, then the masked
    cross-entropy and gradients of ``unfolded(trainable)``'s logits (every branch beside
    the frozen kernels), one backbone pass each, in that order."""
    (loss, _), grads = jax.value_and_grad(
        lambda tr: method.loss(tr, {}, frozen, batch, jax.random.key(2), spec),
        has_aux=True)(trainable)
    want, want_grads = jax.value_and_grad(
        lambda tr: method.masked_ce(unfolded(tr), batch, spec))(trainable)
    return loss, grads, want, want_grads


def test_inflora_folds_the_branches_that_do_not_learn_without_changing_loss_or_gradient(
        monkeypatch):
    """While task 1 of 3 trains, the other tasks' branches are folded into the kernels and
    task 1's rank-r branch stays beside them: the loss, the gradient of B_1 and the head's,
    and the evaluation logits equal those of every branch beside the frozen kernels."""
    backbone, frozen = load_backbone("random:ViT-Micro/4")
    method = create_method("inflora", {"rank": 2}, backbone, 6, 3)
    trainable, _ = method.init(jax.random.key(0), frozen)
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    trainable = jax.tree_util.tree_map(
        lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), trainable)
    spec = task_spec(1, ((0, 1), (2, 3), (4, 5)))
    images = np.random.default_rng(0).normal(size=(4, 16, 16, 1)).astype(np.float32)
    batch = {"inputs": images, "label": jnp.asarray([2, 3, 2, 3])}

    def unfolded(tr):
        context = task_lora_context(tr["lora"], method.lora_cfg)
        return apply_linear_head(tr["head"], backbone.apply(frozen, images, context,
                                                            output="cls"))

    widths = _record_lora_ranks(monkeypatch)
    loss, grads, want, want_grads = _loss_beside_unfolded(method, trainable, frozen, batch,
                                                          spec, unfolded)
    # the loss: one branch of rank r beside the folded kernels; the reference: all T r
    assert widths == [[2], [6]]
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(grads["head"]["kernel"], want_grads["head"]["kernel"],
                               atol=1e-5)
    for layer, targets in grads["lora"].items():
        for target, g in targets.items():
            np.testing.assert_allclose(g["B"][1], want_grads["lora"][layer][target]["B"][1],
                                       atol=1e-5, rtol=1e-4)
            assert not np.asarray(g["B"][0]).any()  # folded: a constant
    logits = method.logits(trainable, {}, frozen, batch, spec)
    assert widths[-1] == []  # evaluation: every branch folded
    np.testing.assert_allclose(logits, unfolded(trainable), atol=1e-4)


def test_inflora_keeps_its_branches_apart_where_matmuls_round_below_float32(monkeypatch):
    """Folding needs float32 matmuls: on this CPU in float32, not in bf16; on a GPU (TF32 by
    default) only under float32 matmul precision. Elsewhere InfLoRA keeps every branch
    beside the kernels (rank T r)."""
    assert folds_exactly("float32") and not folds_exactly("bfloat16")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not folds_exactly("float32")
    with jax.default_matmul_precision("highest"):
        assert folds_exactly("float32")
    backbone, frozen = load_backbone("random:ViT-Micro/4")
    method = create_method("inflora", {"rank": 2}, backbone, 6, 3)
    trainable, _ = method.init(jax.random.key(0), frozen)
    widths = _record_lora_ranks(monkeypatch)
    images = np.zeros((2, 16, 16, 1), np.float32)
    method.loss(trainable, {}, frozen, {"inputs": images, "label": jnp.asarray([2, 3])},
                jax.random.key(1), task_spec(1, ((0, 1), (2, 3), (4, 5))))
    assert widths == [[6]]
    with pytest.raises(ValueError, match="task LoRAs must be"):
        fold_task_loras(frozen, trainable["lora"], LoraConfig(r=3, lora_alpha=3))


# ----------------------------------------------------------------------------- stacked LoRAs
def test_stacked_task_loras_add_up_like_single_loras():
    cfg = vit.get_config("ViT-Micro/4")
    params = vit.init_params(cfg, jax.random.key(0))
    lora_cfg = LoraConfig(r=2, lora_alpha=4, target_modules=("query", "value"))
    stacked = init_task_loras(cfg, lora_cfg, 3, jax.random.key(1))
    for t in range(3):  # slice t is init_lora's draw from fold_in(rng, t), to the bit
        jax.tree_util.tree_map(
            lambda leaf, one, t=t: np.testing.assert_array_equal(leaf[t], one), stacked,
            init_lora(cfg, lora_cfg, jax.random.fold_in(jax.random.key(1), t)))
    stacked = jax.tree_util.tree_map(
        lambda x: x + 0.3 * jax.random.normal(jax.random.key(2), x.shape), stacked)
    weights = jnp.asarray([0.5, 2.0, 0.0])
    images = np.random.default_rng(0).normal(size=(3, 16, 16, 1)).astype(np.float32)
    got = vit.apply(cfg, params, images, task_lora_context(stacked, lora_cfg, weights),
                    output="tokens")
    # the same update from single LoRAs: B_t scaled by w_t, then summed as one merged kernel
    single = lambda t: jax.tree_util.tree_map(lambda x: x[t], stacked)
    merged = params
    for t in range(3):
        one = {layer: {k: {"A": f["A"], "B": f["B"] * weights[t]} for k, f in targets.items()}
               for layer, targets in single(t).items()}
        merged = merge_lora(merged, one, lora_cfg)
    want = vit.apply(cfg, merged, images, output="tokens")
    np.testing.assert_allclose(got, want, atol=2e-5)
    # ... and folded into the kernels at once
    folded = vit.apply(cfg, fold_task_loras(params, stacked, lora_cfg, weights), images,
                       output="tokens")
    np.testing.assert_allclose(folded, want, atol=2e-5)
    # ||A_t B_t||_F from the Gram matrices equals numpy's norm of the product
    norms = product_norms(stacked)
    f = stacked["0"]["query"]
    for t in range(3):
        np.testing.assert_allclose(norms["0"]["query"][t],
                                   np.linalg.norm(np.asarray(f["A"][t]) @ np.asarray(f["B"][t])),
                                   rtol=1e-5)
    assert lora_context(single(0), lora_cfg).layers[0].lora_scaling == 2.0


# ----------------------------------------------------------------------------- SD-LoRA
def test_sd_lora_update_is_magnitudes_times_normalised_directions():
    rng = np.random.default_rng(0)
    lora = {"0": {"query": {"A": jnp.asarray(rng.normal(size=(4, 6, 2)), jnp.float32),
                            "B": jnp.asarray(rng.normal(size=(4, 2, 5)), jnp.float32)}}}
    lora["0"]["query"]["B"] = lora["0"]["query"]["B"].at[3].set(0.0)  # a later task: B = 0
    alpha = jnp.asarray([0.7, 1.3, 0.9, 0.8])
    a, b = np.asarray(lora["0"]["query"]["A"]), np.asarray(lora["0"]["query"]["B"])
    for norm, denominator in (("factors", lambda i: np.linalg.norm(a[i]) * np.linalg.norm(b[i])),
                              ("product", lambda i: np.linalg.norm(a[i] @ b[i]))):
        w = np.asarray(direction_weights(lora, alpha, 2, norm)["0"]["query"])
        delta = sum(w[i] * a[i] @ b[i] for i in range(4))
        want = sum(float(alpha[i]) * a[i] @ b[i] / denominator(i) for i in range(2)) + \
            float(alpha[2]) * a[2] @ b[2]  # the current task's direction is not normalised
        np.testing.assert_allclose(delta, want, rtol=1e-5, atol=1e-6)
        assert w[3] == 0 and np.all(np.isfinite(w))


@pytest.mark.parametrize("carry", [False, True])
def test_sd_lora_freezes_old_directions_while_magnitudes_learn(carry):
    workdir = tempfile.mkdtemp()
    c = tiny_config("sd_lora", rank=2, carry_magnitudes=carry, ranks=(2, 1))
    c.scenario.num_tasks = 2
    c.train.optimizer, c.train.momentum, c.train.learning_rate = "sgd", 0.9, 0.05
    train_and_evaluate(c, workdir)
    first, second = task_checkpoints(workdir, (0, 1), "trainable")
    for layer, targets in second["lora"].items():
        for target, f in targets.items():
            old = first["lora"][layer][target]
            np.testing.assert_array_equal(f["A"][0], old["A"][0])  # direction 0 frozen
            np.testing.assert_array_equal(f["B"][0], old["B"][0])
            assert np.abs(f["B"][1][0]).max() > 0                  # task 1 learnt ...
            assert np.all(f["A"][1][:, 1] == 0) and np.all(f["B"][1][1] == 0)  # ... at rank 1
    m0, m1 = np.asarray(first["magnitude"]), np.asarray(second["magnitude"])
    assert m0[0] != np.float32(0.8) and m1[0] != m0[0] and m1[1] != np.float32(0.8)
    assert m0[1] == np.float32(0.8)  # a later task's magnitude waits for its task
    # the official code starts every task's magnitudes at 0.8 again; the paper carries them
    backbone, frozen = load_backbone("random:ViT-Micro/4")
    method = create_method("sd_lora", {"rank": 2, "carry_magnitudes": carry}, backbone, 10, 2)
    trainable = dict(first, magnitude=jnp.asarray(m0))
    after, _ = method.before_task(None, trainable, {}, frozen, None, jax.random.key(0))
    np.testing.assert_array_equal(after["magnitude"], m0 if carry else np.full(2, 0.8, np.float32))


# ----------------------------------------------------------------------------- O-LoRA
def test_o_lora_losses_equal_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 6, 2)).astype(np.float32)
    b = np.zeros((3, 2, 5), np.float32)
    lora = {"0": {"query": {"A": jnp.asarray(a), "B": jnp.asarray(b)}}}
    # official: sum |lora_A_old @ lora_A_new^T| with lora_A = A^T (r x d_in), old = tasks < t
    want = sum(np.abs(a[s].T @ a[2]).sum() for s in range(2))
    assert float(orthogonality_loss(lora, 2)) == pytest.approx(want, rel=1e-5)
    assert float(orthogonality_loss(lora, 0)) == 0.0
    assert float(l2_loss(lora, 1)) == pytest.approx(np.linalg.norm(a[1]), rel=1e-5)
    grads = jax.grad(lambda tree: l2_loss(tree, 1))(lora)  # B_1 = 0: finite, not NaN
    assert np.all(np.isfinite(np.asarray(grads["0"]["query"]["B"])))


def test_o_lora_keeps_old_loras_and_trains_against_them():
    workdir = tempfile.mkdtemp()
    c = tiny_config("o_lora", rank=2)
    c.scenario.num_tasks = 2
    c.train.optimizer = "adamw"
    results = train_and_evaluate(c, workdir)
    first, second = task_checkpoints(workdir, (0, 1), "trainable")
    for layer, targets in second["lora"].items():
        for target, f in targets.items():
            old = first["lora"][layer][target]
            np.testing.assert_array_equal(f["A"][0], old["A"][0])
            np.testing.assert_array_equal(f["B"][0], old["B"][0])
            assert not np.array_equal(f["A"][1], old["A"][1])
    assert results["compilation"]["traces"] == {"train_step": 1, "eval_step": 1}


# ----------------------------------------------------------------------------- sizes
def test_paper_configuration_sizes():
    vit_b = Backbone(vit.get_config("ViT-B/16", num_classes=0))
    # InfLoRA: B of key and value in 12 blocks at rank 10 + a 10-class head per task
    # (official log "Trainable params: 192010" per task)
    inflora = create_method("inflora", {}, vit_b, 100, 10)
    trainable, state = jax.eval_shape(lambda k: inflora.init(k, None), jax.random.key(0))
    assert inflora.count_trainable(trainable, state) == 10 * 184_320 + 76_900
    assert state["basis"].shape == (12, 768, 768)
    # SD-LoRA: q and v at rank 10, 36,864 r = 368,640 a task (official log 368,661 with its
    # 21 magnitude slots); RR: 10, 10, 10, 10, 8, 8, 8, 8, 6, 6
    sd = create_method("sd_lora", {}, vit_b, 100, 10)
    trainable, state = jax.eval_shape(lambda k: sd.init(k, None), jax.random.key(0))
    assert sd.count_trainable(trainable, state) == 10 * 368_640 + 10 + 76_900
    rr = create_method("sd_lora", {"ranks": (10, 10, 10, 10, 8, 8, 8, 8, 6, 6)}, vit_b, 100, 10)
    trainable, state = jax.eval_shape(lambda k: rr.init(k, None), jax.random.key(0))
    assert rr.count_trainable(trainable, state) == 36_864 * (4 * 10 + 4 * 8 + 2 * 6) + 10 + 76_900
    # O-LoRA: q and v at rank 8 in 12 blocks, 294,912 a task
    ol = create_method("o_lora", {}, vit_b, 100, 10)
    trainable, state = jax.eval_shape(lambda k: ol.init(k, None), jax.random.key(0))
    assert ol.count_trainable(trainable, state) == 10 * 294_912 + 76_900


def test_sd_lora_folds_the_earlier_directions_without_changing_loss_or_gradients(
        monkeypatch):
    """While task 2 of 4 trains, tasks 0 and 1's weighted directions are folded into the
    kernels -- their magnitudes still learn, through the folded kernel -- beside task 2's
    rank-r branch: the loss and the gradients of the magnitudes, of A_2, B_2 and the head
    equal the stacked branch's; evaluation folds every task."""
    backbone, frozen = load_backbone("random:ViT-Micro/4")
    method = create_method("sd_lora", {"rank": 2}, backbone, 8, 4)
    assert method.fold_in_training  # D = 32 < 6 r (T - 1) = 36
    trainable, _ = method.init(jax.random.key(0), frozen)
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    trainable = jax.tree_util.tree_map(
        lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape), trainable)
    classes = ((0, 1), (2, 3), (4, 5), (6, 7))
    spec = task_spec(2, classes)
    images = np.random.default_rng(0).normal(size=(4, 16, 16, 1)).astype(np.float32)
    batch = {"inputs": images, "label": jnp.asarray([4, 5, 4, 5])}

    def stacked(tr):
        weights = direction_weights(tr["lora"], tr["magnitude"], 2, "factors")
        context = task_lora_context(tr["lora"], method.lora_cfg, weights)
        return apply_linear_head(tr["head"], backbone.apply(frozen, images, context,
                                                            output="cls"))

    widths = _record_lora_ranks(monkeypatch)
    loss, grads, want, want_grads = _loss_beside_unfolded(method, trainable, frozen, batch,
                                                          spec, stacked)
    # the loss: one branch of rank r beside the folded kernels; the reference: all T r
    assert widths == [[2], [8]]
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(grads["magnitude"], want_grads["magnitude"], rtol=1e-4,
                               atol=1e-6)
    assert np.abs(np.asarray(grads["magnitude"])[:2]).min() > 0  # learning through the fold
    np.testing.assert_allclose(grads["head"]["kernel"], want_grads["head"]["kernel"],
                               atol=1e-5)
    for layer, targets in grads["lora"].items():
        for target, g in targets.items():
            for factor in ("A", "B"):
                np.testing.assert_allclose(g[factor][2],
                                           want_grads["lora"][layer][target][factor][2],
                                           atol=1e-5, rtol=1e-4)
                assert not np.asarray(g[factor][:2]).any()  # folded: constants
    logits = method.logits(trainable, {}, frozen, batch, spec)
    assert widths[-1] == []  # evaluation: every task folded
    np.testing.assert_allclose(logits, stacked(trainable), atol=1e-4)
    # as the loop runs it: one program, the task index traced
    traced = jax.jit(lambda tr, index: method.loss(
        tr, {}, frozen, batch, jax.random.key(2), dataclasses.replace(spec, index=index))[0])
    np.testing.assert_allclose(traced(trainable, np.int32(2)), want, rtol=1e-5)


@pytest.mark.parametrize("rank, num_tasks, folds", [(2, 4, True), (2, 3, False),
                                                    (1, 20, True)])
def test_sd_lora_folds_while_training_only_where_that_costs_less(rank, num_tasks, folds,
                                                                 monkeypatch):
    """The kernel's gradient costs D^2 a token, the stacked branch 6 D r (T - 1) more than
    task t's own: SD-LoRA folds while training iff D < 6 r (T - 1) (ViT-Micro's D = 32);
    otherwise its step keeps every task's branch (rank T r), and evaluation still folds."""
    backbone, frozen = load_backbone("random:ViT-Micro/4")
    method = create_method("sd_lora", {"rank": rank}, backbone, 2 * num_tasks, num_tasks)
    assert method.fold_in_training is folds
    trainable, _ = method.init(jax.random.key(0), frozen)
    spec = task_spec(1, tuple((2 * t, 2 * t + 1) for t in range(num_tasks)))
    images = np.zeros((2, 16, 16, 1), np.float32)
    widths = _record_lora_ranks(monkeypatch)
    method.loss(trainable, {}, frozen, {"inputs": images, "label": jnp.asarray([2, 3])},
                jax.random.key(2), spec)
    method.logits(trainable, {}, frozen, {"inputs": images}, spec)
    assert widths == [[rank] if folds else [rank * num_tasks], []]


def test_sd_lora_keeps_its_branches_apart_where_matmuls_round_below_float32(monkeypatch):
    """On a GPU with its default TF32 matmuls nothing is folded: the step and evaluation
    carry every task's branch (rank T r)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    backbone, frozen = load_backbone("random:ViT-Micro/4")
    method = create_method("sd_lora", {"rank": 2}, backbone, 8, 4)
    trainable, _ = method.init(jax.random.key(0), frozen)
    spec = task_spec(1, ((0, 1), (2, 3), (4, 5), (6, 7)))
    images = np.zeros((2, 16, 16, 1), np.float32)
    widths = _record_lora_ranks(monkeypatch)
    method.loss(trainable, {}, frozen, {"inputs": images, "label": jnp.asarray([2, 3])},
                jax.random.key(2), spec)
    method.logits(trainable, {}, frozen, {"inputs": images}, spec)
    assert widths == [[8], [8]]
