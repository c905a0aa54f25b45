"""The frozen/trainable split, label-routed optimizers and parameter counts."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pecft_jax.backbones import vit
from pecft_jax.peft import lora, prompt_pool
from pecft_jax.train import partition

CFG = vit.get_config("ViT-Demo/7", num_layers=1, hidden_size=16, mlp_dim=24, num_heads=2)
LORA = lora.LoraConfig(r=4, lora_alpha=8, target_modules=("query", "value"))
RULES = [(r"^backbone/", "frozen"), (r"^lora/0/value/", "old"), (r"^lora/", "lora"),
         (r"^head/", "head")]


def _full_tree():
    """Backbone + LoRA on query/value + a 3-class head, all with random values."""
    rng = np.random.default_rng(0)
    shapes = {
        "backbone": jax.eval_shape(lambda k: vit.init_params(CFG, k), jax.random.key(0)),
        "lora": jax.eval_shape(lambda k: lora.init_lora(CFG, LORA, k), jax.random.key(0)),
        "head": {"kernel": jax.ShapeDtypeStruct((16, 3), jnp.float32),
                 "bias": jax.ShapeDtypeStruct((3,), jnp.float32)},
    }
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), jnp.float32), shapes)


def _shapes(tree):
    return sorted(tuple(x.shape) for x in jax.tree_util.tree_leaves(tree))


def test_split_and_merge_round_trip():
    full = _full_tree()
    labels = partition.label_tree(full, RULES)
    assert labels["lora"]["0"] == {"query": {"A": "lora", "B": "lora"},
                                 "value": {"A": "old", "B": "old"}}
    trainable, frozen = partition.split(full, labels)
    assert set(frozen) == {"backbone"} and set(trainable) == {"lora", "head"}
    assert frozen["backbone"]["cls"] is full["backbone"]["cls"]  # no copies
    assert trainable["lora"]["0"]["value"]["A"] is full["lora"]["0"]["value"]["A"]
    merged = partition.merge(trainable, frozen)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(full)
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(merged),
                                      jax.tree_util.tree_leaves(full)))
    # a predicate works too, and a partial subtree is split leaf by leaf
    only_b, rest = partition.split(full, lambda path, leaf: path.endswith("/B"))
    assert list(only_b) == ["lora"] and set(only_b["lora"]["0"]) == {"query", "value"}
    assert set(rest["lora"]["0"]["query"]) == {"A"}
    with pytest.raises(ValueError, match="present in both trees"):
        partition.merge(trainable, {"head": {"bias": full["head"]["bias"]}})
    with pytest.raises(ValueError, match="same structure as params"):
        partition.split(full, {"backbone": labels["backbone"]})


def test_label_tree_errors_and_default():
    tree = {"a": {"x": np.zeros(2)}, "b": np.zeros(3)}
    with pytest.raises(ValueError, match=r"no rule matches 1 leaves.*'b'"):
        partition.label_tree(tree, {"^a/": "one"})
    assert partition.label_tree(tree, {"^a/": "one"}, default="frozen") == {
        "a": {"x": "one"}, "b": "frozen"}
    with pytest.raises(ValueError, match="invalid rule regex"):
        partition.label_tree(tree, [("(", "one")])


def test_make_optimizer_rejects_missing_groups():
    labels = {"a": "lora", "b": "head", "c": "frozen"}
    with pytest.raises(ValueError, match=r"labels \['head'\] have no optimizer group"):
        partition.make_optimizer(labels, {"lora": 1e-3})
    with pytest.raises(ValueError, match="'frozen' leaves are never optimised"):
        partition.make_optimizer(labels, {"lora": 1e-3, "head": 1e-3, "frozen": optax.sgd(1.0)})
    with pytest.raises(TypeError, match="group 'lora'"):
        partition.make_optimizer(labels, {"lora": "fast", "head": 1e-3})


def torch_clip_grad_norm(grads, max_norm):
    """``torch.nn.utils.clip_grad_norm_`` over a list of numpy gradients, written out: one
    norm over every gradient, each scaled by ``max_norm / (norm + 1e-6)`` when below 1."""
    total = np.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads))
    coefficient = min(1.0, max_norm / (total + 1e-6))
    return [g * coefficient for g in grads]


def test_clip_norm_is_one_norm_over_every_group():
    """HiDe-Prompt's two groups (prompts; a head at a tenth of the rate) under clipping at 1:
    the gradients of both groups are scaled by one global norm, as the official
    ``clip_grad_norm_(model.parameters(), max_norm)``; a 'frozen' leaf is not in the norm."""
    labels = {"prompt": "prompt", "head": "head", "old": "frozen"}
    opt = partition.make_optimizer(labels, {"prompt": optax.sgd(1.0),
                                            "head": optax.chain(optax.sgd(1.0),
                                                                optax.scale(0.1))},
                                   clip_norm=1.0)
    rng = np.random.default_rng(0)
    trainable = {k: jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) for k in labels}
    learning, _ = opt.split(trainable)
    grads = {"prompt": 3.0 * rng.normal(size=(3, 4)).astype(np.float32),
             "head": 2.0 * rng.normal(size=(3, 4)).astype(np.float32), "old": None}
    updates, _ = opt.transform.update(grads, opt.init(trainable), learning)
    clipped = torch_clip_grad_norm([grads["prompt"], grads["head"]], 1.0)
    np.testing.assert_allclose(updates["prompt"], -clipped[0], rtol=1e-5)
    np.testing.assert_allclose(updates["head"], -0.1 * clipped[1], rtol=1e-5)
    # per group, each gradient would have been clipped to norm 1 on its own
    assert abs(float(np.linalg.norm(updates["prompt"])) - 1.0) > 0.05
    # below the norm nothing is scaled; without clip_norm nothing either
    small = {"prompt": grads["prompt"] * 1e-3, "head": grads["head"] * 1e-3, "old": None}
    updates, _ = opt.transform.update(small, opt.init(trainable), learning)
    np.testing.assert_allclose(updates["prompt"], -small["prompt"], rtol=1e-6)
    plain = partition.make_optimizer(labels, {"prompt": optax.sgd(1.0), "head": optax.sgd(1.0)})
    updates, _ = plain.transform.update(grads, plain.init(trainable), learning)
    np.testing.assert_allclose(updates["head"], -grads["head"], rtol=1e-6)


def test_training_touches_only_trainable_groups():
    full = _full_tree()
    labels = partition.label_tree(full, RULES)
    trainable, frozen = partition.split(full, labels)
    trainable_labels, _ = partition.split(labels, labels)
    lr_lora, lr_head = 1e-2, 0.5
    # 'old' leaves are frozen inside the trainable tree: cut out of grad and optimizer
    opt = partition.make_optimizer(trainable_labels, {"lora": optax.adam(lr_lora), "head": lr_head},
                                   frozen_label="old", default_optimizer=optax.sgd)

    # The state holds Adam moments for the 'lora' group only (+ its step count): nothing for
    # the 'old' leaves, the SGD group or the backbone (which never enters the optimizer).
    state = opt.init(trainable)
    lora_group = [trainable["lora"]["0"]["query"]["A"], trainable["lora"]["0"]["query"]["B"]]
    assert _shapes(state) == sorted(2 * [tuple(x.shape) for x in lora_group] + [()])

    images = np.random.default_rng(1).normal(size=(4, 28, 28, 1)).astype(np.float32)
    targets = np.array([0, 1, 2, 1])

    def loss_fn(trainable, frozen):
        feats = vit.apply(CFG, frozen["backbone"], images,
                          lora.lora_context(trainable["lora"], LORA), output="cls")
        logits = feats @ trainable["head"]["kernel"] + trainable["head"]["bias"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def step(trainable, frozen, state):
        learning, fixed = opt.split(trainable)
        loss, grads = jax.value_and_grad(  # w.r.t. the learning leaves only
            lambda params: loss_fn(opt.merge(params, fixed), frozen))(learning)
        updates, state = opt.transform.update(grads, state, learning)
        return opt.merge(optax.apply_updates(learning, updates), fixed), state, loss, grads

    frozen_before = jax.tree_util.tree_map(np.array, frozen)
    start = jax.tree_util.tree_map(np.array, trainable)
    new, state, first_loss, grads = step(trainable, frozen, state)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(trainable)
    assert grads["lora"]["0"]["value"] == {"A": None, "B": None}  # never differentiated

    # First step, group by group: SGD moves by -lr * g; Adam's first step is
    # -lr * g / (|g| + eps) (bias-corrected moments are g and g^2); 'old' leaves stay put.
    g = jax.tree_util.tree_map(np.asarray, grads)
    np.testing.assert_allclose(new["head"]["kernel"],
                               start["head"]["kernel"] - lr_head * g["head"]["kernel"], atol=1e-6)
    g_b = g["lora"]["0"]["query"]["B"]
    assert np.abs(g_b).max() > 1e-4
    adam_step = lr_lora * g_b / (np.abs(g_b) + 1e-8)
    np.testing.assert_allclose(new["lora"]["0"]["query"]["B"],
                               start["lora"]["0"]["query"]["B"] - adam_step, atol=1e-6)
    np.testing.assert_array_equal(new["lora"]["0"]["value"]["B"], start["lora"]["0"]["value"]["B"])

    for _ in range(8):
        new, state, loss, _ = step(new, frozen, state)
    assert float(loss) < float(first_loss)
    for want, got in zip(jax.tree_util.tree_leaves(frozen_before),
                         jax.tree_util.tree_leaves(frozen)):
        np.testing.assert_array_equal(got, want)  # bit-identical backbone
    np.testing.assert_array_equal(new["lora"]["0"]["value"]["A"], start["lora"]["0"]["value"]["A"])
    np.testing.assert_array_equal(new["lora"]["0"]["value"]["B"], start["lora"]["0"]["value"]["B"])
    assert np.abs(new["lora"]["0"]["query"]["A"] - start["lora"]["0"]["query"]["A"]).max() > 1e-3
    assert _shapes(state) == sorted(2 * [tuple(x.shape) for x in lora_group] + [()])


def test_paper_parameter_counts_without_allocating():
    vit_b = vit.get_config("ViT-B/16", num_classes=100)
    lora_b = jax.eval_shape(
        lambda k: lora.init_lora(vit_b, lora.LoraConfig(r=8, lora_alpha=16), k),
        jax.random.key(0))
    assert partition.count_params(lora_b) == 12 * 2 * (768 * 8 + 8 * 768) == 294_912

    pool = jax.eval_shape(lambda k: prompt_pool.init_pool(10, 5, 768, k), jax.random.key(0))
    assert partition.count_params(pool) == 10 * 5 * 768 + 10 * 768 == 46_080

    backbone = jax.eval_shape(lambda k: vit.init_params(vit_b, k), jax.random.key(0))
    labels = partition.label_tree(backbone, {"^head/": "head"}, default="frozen")
    assert partition.count_params(backbone, labels, "head") == 768 * 100 + 100 == 76_900
    # ViT-B/16 without head has 85,798,656 parameters (86,567,656 with timm's 1000-class head)
    assert partition.count_params(backbone, labels, "frozen") == 85_798_656
    assert partition.count_params(backbone) == 85_798_656 + 76_900
    with pytest.raises(ValueError, match="needs the labels tree"):
        partition.count_params(backbone, label="head")
