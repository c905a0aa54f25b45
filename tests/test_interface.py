"""The Method interface v2 as the loop offers it: methods that take no gradient step or only
on the first task, replace their trainables after a task, change their gradients in
``update``; device-side reductions over a task; config dataclasses; lr multipliers."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pecft_jax.backbones.backbone import load_backbone
from pecft_jax.methods import create_method, get_method_class
from pecft_jax.methods.base import parse_config
from pecft_jax.methods.finetune import Finetune
from pecft_jax.train import partition
from pecft_jax.train.checkpoint import Checkpointer
from pecft_jax.train.loop import ContinualTrainer, train_and_evaluate

from helpers import (Interrupted, array_task_data, assert_same_task_checkpoint,
                     crash_at_training_batch, first_gradient_step, tiny_config)


# ------------------------------------------------------------------ TaskData.reduce / map
def _gram_and_class_sums(carry, batch, w):
    x = batch["inputs"].reshape(batch["inputs"].shape[0], -1) @ w
    xm = x * batch["mask"][:, None]
    onehot = jax.nn.one_hot(batch["label"], carry["sums"].shape[0]) * batch["mask"][:, None]
    return {"gram": carry["gram"] + xm.T @ x, "sums": carry["sums"] + onehot.T @ x,
            "count": carry["count"] + batch["mask"].sum()}


def test_reduce_sums_across_the_mesh_exactly_as_on_one_device():
    rng = np.random.default_rng(0)
    # integer-valued data: every partial sum is exact in float32, whatever the order
    images = rng.integers(-3, 4, (45, 2, 2, 1)).astype(np.float32)  # 45: last batch padded
    labels = rng.integers(0, 3, 45)
    w = rng.integers(-2, 3, (4, 5)).astype(np.float32)
    init = {"gram": jnp.zeros((5, 5)), "sums": jnp.zeros((3, 5)), "count": jnp.zeros(())}
    eight = array_task_data(images, labels, batch=16).reduce(_gram_and_class_sums, init, w)
    one = array_task_data(images, labels, batch=16, num_devices=1).reduce(
        _gram_and_class_sums, init, w)
    assert eight["gram"].sharding.is_fully_replicated  # on every device of the 8-device mesh
    assert len(eight["gram"].sharding.device_set) == 8
    for key in init:
        np.testing.assert_array_equal(np.asarray(eight[key]), np.asarray(one[key]))
    x = images.reshape(45, -1) @ w  # padding rows excluded
    np.testing.assert_array_equal(np.asarray(eight["gram"]), x.T @ x)
    for c in range(3):
        np.testing.assert_array_equal(np.asarray(eight["sums"][c]), x[labels == c].sum(0))
    assert float(eight["count"]) == 45


def test_reduce_waits_for_its_chain_every_few_batches(monkeypatch):
    """The batches' programs chain through the carry, each with an all-reduce: on CPU
    devices the reduce waits for the carry every ``MAX_QUEUED_PROGRAMS`` batches (XLA:CPU
    deadlocked on long queues of such programs; see ``compiler.bound_queue``), and the
    result is unchanged."""
    from pecft_jax import compiler
    rng = np.random.default_rng(2)
    images = rng.integers(-3, 4, (45, 2, 2, 1)).astype(np.float32)  # 6 batches of 8
    labels = rng.integers(0, 3, 45)
    w = rng.integers(-2, 3, (4, 5)).astype(np.float32)
    init = {"gram": jnp.zeros((5, 5)), "sums": jnp.zeros((3, 5)), "count": jnp.zeros(())}
    expected = array_task_data(images, labels).reduce(_gram_and_class_sums, init, w)
    waited, real_wait = [], jax.block_until_ready

    def wait(tree):
        waited.append(float(tree["count"]))  # how far the chain had got
        return real_wait(tree)
    monkeypatch.setattr(compiler, "MAX_QUEUED_PROGRAMS", 2)
    monkeypatch.setattr(compiler.jax, "block_until_ready", wait)
    got = array_task_data(images, labels).reduce(_gram_and_class_sums, init, w)
    assert waited == [16.0, 32.0, 45.0]  # after batches 2, 4 and 6
    for key in init:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(expected[key]))


def test_bound_queue_waits_on_every_nth_program_on_cpu_devices_only(monkeypatch):
    """Every third program's output is waited for while it lives on CPU devices; the same
    output on an accelerator is never waited for (the deadlock is XLA:CPU's)."""
    from pecft_jax import compiler
    waited = []
    monkeypatch.setattr(compiler, "MAX_QUEUED_PROGRAMS", 3)
    monkeypatch.setattr(compiler.jax, "block_until_ready", waited.append)
    outputs = [{"out": jnp.full((2,), count)} for count in range(1, 8)]
    for count, output in enumerate(outputs, 1):
        compiler.bound_queue(count, output)
    assert [int(w["out"][0]) for w in waited] == [3, 6]

    class GPU:  # what bound_queue reads of an output: its devices' platform
        platform = "gpu"

    class OnGPU:
        sharding = type("Sharding", (), {"device_set": {GPU()}})
    waited.clear()
    for count in range(1, 8):
        compiler.bound_queue(count, [OnGPU()])
    assert waited == []


@pytest.mark.parametrize("num_devices, replicated_init", [(8, False), (2, True), (1, True)])
def test_additive_reduce_sums_each_devices_shard_and_counts_init_once(num_devices,
                                                                     replicated_init):
    rng = np.random.default_rng(1)
    images = rng.integers(-3, 4, (45, 2, 2, 1)).astype(np.float32)
    labels = rng.integers(0, 3, 45)
    w = rng.integers(-2, 3, (4, 5)).astype(np.float32)
    data = array_task_data(images, labels, batch=16, num_devices=num_devices)
    # a non-zero start (a method's running sums): it must be counted once, not per device;
    # replicated: what a method passes when its state came from an earlier pass
    init = {"gram": np.full((5, 5), 7.0, np.float32), "sums": np.ones((3, 5), np.float32),
            "count": np.full((), 2.0, np.float32)}
    if replicated_init:
        init = data.replicate(init)
    before = jax.tree_util.tree_map(np.array, init)
    summed = data.reduce(_gram_and_class_sums, init, w, additive=True)
    folded = array_task_data(images, labels, batch=16, num_devices=1).reduce(
        _gram_and_class_sums, before, w)
    assert summed["gram"].sharding.is_fully_replicated
    assert len(summed["gram"].sharding.device_set) == num_devices
    for key in before:  # integer-valued: exact in any order
        np.testing.assert_array_equal(np.asarray(summed[key]), np.asarray(folded[key]))
        np.testing.assert_array_equal(np.asarray(init[key]), before[key])  # init untouched
    x = images.reshape(45, -1) @ w
    np.testing.assert_array_equal(np.asarray(summed["gram"]), 7.0 + x.T @ x)
    assert float(summed["count"]) == 47
    # a second pass runs the same compiled fold: no new trace
    again = data.reduce(_gram_and_class_sums, init, w, additive=True)
    np.testing.assert_array_equal(np.asarray(again["sums"]), np.asarray(summed["sums"]))
    assert data._compiled[("reduce_additive", _gram_and_class_sums)]._cache_size() == 1


def test_on_one_device_takes_the_local_copy_of_a_replicated_result_and_refuses_shards():
    images = np.arange(16, dtype=np.float32).reshape(16, 1, 1, 1)
    data = array_task_data(images, np.zeros(16, int), batch=8)
    summed = data.reduce(lambda carry, batch: carry + batch["inputs"].sum(), jnp.zeros(()))
    assert len(summed.sharding.device_set) == 8
    host = np.arange(3.0)
    local, placed = data.on_one_device((summed, host))
    first = min(jax.devices(), key=lambda d: d.id)
    assert local.devices() == {first} and placed.devices() == {first}
    # no transfer: the very buffer the replicated array holds on that device
    shard = next(s.data for s in summed.addressable_shards if s.device == first)
    assert local.unsafe_buffer_pointer() == shard.unsafe_buffer_pointer()
    assert float(local) == 120.0
    np.testing.assert_array_equal(np.asarray(placed), host)
    # a function of it runs on that device alone
    assert jax.jit(lambda x: x * 2)(local).devices() == {first}
    sharded = jax.device_put(np.arange(8.0), jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.devices()), ("data",)),
        jax.sharding.PartitionSpec("data")))
    with pytest.raises(ValueError, match="replicated arrays"):
        data.on_one_device({"x": sharded})
    # an array on another device than the chosen one is moved there
    elsewhere = jax.device_put(np.arange(2.0), jax.devices()[3])
    moved = data.on_one_device(elsewhere)
    assert moved.devices() == {first}
    np.testing.assert_array_equal(np.asarray(moved), np.arange(2.0))


@pytest.mark.parametrize("num_devices", [8, 1])
def test_on_one_device_places_every_kind_of_input_alike(num_devices):
    """A replicated result, a host array and an uncommitted jnp array come back with one
    placement, so the algebra jitted on them compiles once (RanPAC's first task gave it
    an uncommitted G, the later ones a host G: two compilations of the solve)."""
    images = np.arange(16, dtype=np.float32).reshape(16, 1, 1, 1)
    data = array_task_data(images, np.zeros(16, int), batch=8, num_devices=num_devices)
    summed = data.reduce(lambda carry, batch: carry + batch["inputs"].sum(), jnp.zeros(()))
    first = min(summed.sharding.device_set, key=lambda d: d.id)
    placed = data.on_one_device((summed, np.float32(2.0), jnp.float32(3.0)))
    assert {x.sharding for x in placed} == {jax.sharding.SingleDeviceSharding(first)}
    add = jax.jit(lambda a, b: a + b)
    assert [float(add(placed[0], x)) for x in placed] == [240.0, 122.0, 123.0]
    assert add._cache_size() == 1


def test_map_passes_labels_and_positions_and_drops_padding():
    images = np.arange(21, dtype=np.float32).reshape(21, 1, 1, 1)
    labels = np.arange(21) % 4
    out, got_labels = array_task_data(images, labels).map(
        lambda batch, scale: {"x": batch["inputs"][:, 0, 0, 0] * scale, "label": batch["label"],
                              "index": batch["index"]}, 2.0)
    np.testing.assert_array_equal(out["x"], 2.0 * np.arange(21))
    np.testing.assert_array_equal(out["label"], labels)
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(out["index"], np.arange(21))


# --------------------------------------------------------------------------- configs
def test_unknown_or_misspelt_method_keys_fail_with_the_valid_ones():
    backbone, _ = load_backbone("random:ViT-Micro/4")
    config = tiny_config("l2p", pool_sise=4)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['pool_sise'\].*'pool_size'"):
        create_method("l2p", config.method, backbone, 10, 5)
    config = tiny_config("finetune", mode="lora", lora={"rank": 4})
    with pytest.raises(ValueError, match=r"method\.lora: unknown key\(s\) \['rank'\].*'r'"):
        create_method("finetune", config.method, backbone, 10, 5)
    with pytest.raises(ValueError, match="unknown finetune mode 'lorra'"):
        create_method("finetune", tiny_config("finetune", mode="lorra").method, backbone, 10, 5)
    # through the loop: the typo fails before anything is trained
    with pytest.raises(ValueError, match="pool_sise"):
        train_and_evaluate(tiny_config("l2p", pool_sise=4), "/tmp/never-written")
    assert not os.path.exists("/tmp/never-written/checkpoints/tasks")


def test_config_holds_the_defaults_and_merges_nested_sections():
    cls = get_method_class("finetune").Config
    config = parse_config(cls, {"name": "finetune", "mode": "lora", "lora": {"r": 4}}, "m")
    assert config.lora.r == 4 and config.lora.lora_alpha == 16  # the rest keeps the default
    assert config.lora.target_modules == ("query", "value")
    assert dataclasses.is_dataclass(config) and parse_config(cls, config, "m") is config
    l2p = parse_config(get_method_class("l2p").Config, {"top_k": 3}, "m")
    assert (l2p.pool_size, l2p.prompt_length, l2p.top_k) == (10, 5, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        l2p.top_k = 4
    with pytest.raises(ValueError, match="top_k=11"):
        parse_config(get_method_class("l2p").Config, {"top_k": 11}, "m")


def test_bad_epochs_fail_before_anything_runs(tmp_path):
    config = tiny_config()
    config.train.epochs = -1
    with pytest.raises(ValueError, match="train.epochs must be an int >= 0"):
        train_and_evaluate(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")


# ----------------------------------------------------------------- 0-step and first task
class _NoOptimizer(ContinualTrainer):
    def optimizer(self, *args, **kwargs):
        raise AssertionError("a method without gradient steps must not build an optimizer")


def test_zero_epochs_compile_no_train_step_and_build_no_optimizer(tmp_path):
    config = tiny_config()
    config.scenario.num_tasks = 2
    config.train.epochs = 0  # L2P with no gradient step: its initial prompts, evaluated
    trainer = _NoOptimizer(config, str(tmp_path))
    try:
        results = trainer.run()
    finally:
        trainer.close()
    assert not any(k.startswith("train_step") for k in trainer.trace_counts)
    assert [len(r) for r in results["accuracy_matrix"]] == [1, 2]


@pytest.fixture(scope="module")
def simplecil_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("simplecil"))
    config = tiny_config("simplecil")
    trainer = _NoOptimizer(config, workdir)
    try:
        results = trainer.run()
    finally:
        trainer.close()
    return config, trainer, results


def test_simplecil_matrix_equals_a_numpy_recomputation(simplecil_run):
    config, trainer, results = simplecil_run
    assert not any(k.startswith("train_step") for k in trainer.trace_counts)
    assert results["trainable_params"] == 0
    from pecft_jax.data import pipeline
    backbone, frozen = trainer.backbone, trainer.frozen
    feature = jax.jit(lambda p, x: backbone.apply(p, x, output="cls"))

    def features(source, indices):
        out, labels = [], []
        for b in pipeline.eval_batches(source, indices, trainer.label_map, batch_size=64,
                                       preprocess=trainer.eval_preprocess):
            keep = b["mask"] > 0
            out.append(np.asarray(feature(frozen, b["inputs"]), np.float64)[keep])
            labels.append(b["label"][keep])
        return np.concatenate(out), np.concatenate(labels)

    tasks = trainer.scenario.tasks
    prototypes = np.zeros((trainer.scenario.num_classes, backbone.feature_dim))
    expected = []
    for t, task in enumerate(tasks):
        f, y = features(task.train_source, task.train_indices)
        for c in task.classes:
            prototypes[c] = f[y == c].mean(0)
        seen = [c for s in tasks[:t + 1] for c in s.classes]
        unit = prototypes[seen] / np.linalg.norm(prototypes[seen], axis=1, keepdims=True)
        row = []
        for s in tasks[:t + 1]:
            g, z = features(s.test_source, s.test_indices)
            pred = np.asarray(seen)[np.argmax(g @ unit.T, axis=1)]
            row.append(100.0 * np.mean(pred == z))
        expected.append(row)
    assert [len(r) for r in results["accuracy_matrix"]] == [1, 2, 3, 4, 5]
    for got, want in zip(results["accuracy_matrix"], expected):
        np.testing.assert_allclose(got, want, atol=1e-9)
    assert 10.0 < np.mean(expected[-1]) < 100.0  # neither chance nor trivially perfect


@pytest.mark.parametrize("arg, classes", [("cifar100", 100), ("imagenet_r", 200)])
def test_simplecil_paper_configuration_stores_one_prototype_per_class(arg, classes):
    from pecft_jax.backbones import vit
    from pecft_jax.backbones.backbone import Backbone
    from helpers import load_experiment_config
    c = load_experiment_config("simplecil", arg)
    assert tuple(c.backbone.mean) == (0.0,) and tuple(c.backbone.std) == (1.0,)  # [0, 1] pixels
    backbone = Backbone(vit.get_config("ViT-B/16", num_classes=0))
    method = create_method("simplecil", c.method, backbone, classes, c.scenario.num_tasks)
    trainable, state = jax.eval_shape(lambda k: method.init(k, None), jax.random.key(0))
    assert trainable == {} and method.train_epochs(None, c.train.epochs) == 0
    assert state["sum"].shape == (classes, 768) and state["count"].shape == (classes,)


def test_simplecil_prototype_of_a_class_met_again_is_its_running_mean():
    """Domain-incremental: the same classes in every task; the prototype is the mean over
    every image of the class seen so far (class-incremental runs never meet one again)."""
    from helpers import task_spec
    backbone, frozen = load_backbone("random:ViT-Micro/4")
    method = create_method("simplecil", {}, backbone, 2, 2)
    trainable, state = method.init(jax.random.key(0), frozen)
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(12, 16, 16, 1)).astype(np.float32) + k for k in (0.0, 1.0)]
    labels = np.repeat([0, 1], 6)
    for t in range(2):
        trainable, state = method.after_task(task_spec(t, [[0, 1], [0, 1]], 2), trainable, state,
                                             frozen, array_task_data(images[t], labels), None)
    feats = np.asarray(backbone.apply(frozen, np.concatenate(images), output="cls"), np.float64)
    both = np.concatenate([labels, labels])
    means = np.stack([feats[both == c].mean(0) for c in (0, 1)])
    np.testing.assert_allclose(np.asarray(state["sum"]) / np.asarray(state["count"])[:, None],
                               means, rtol=1e-4, atol=1e-5)


def test_first_task_only_method_trains_task_zero_and_replaces_its_trainables(tmp_path):
    config = tiny_config("ranpac", M=32, first_session="adapter", adapter={"bottleneck_dim": 4},
                         ridges=(1e-2, 1.0, 100.0))
    config.scenario.num_tasks = 2
    config.train.optimizer = "sgd"
    config.train.momentum = 0.9
    results = train_and_evaluate(config, str(tmp_path))
    compiled = {k for k in results["compilation"]["traces"] if k.startswith("train_step")}
    assert compiled == {"train_step"}  # phase 1 on the first task only
    ckpt = Checkpointer(str(tmp_path))
    try:
        first, last = ckpt.restore("tasks", 0), ckpt.restore("tasks", 1)
    finally:
        ckpt.close()
    # after_task dropped phase 1's cosine head: the trainable tree is just the adapter ...
    assert set(first["trainable"]) == set(last["trainable"]) == {"peft"}
    # ... which no later task changes
    for a, b in zip(jax.tree_util.tree_leaves(first["trainable"]),
                    jax.tree_util.tree_leaves(last["trainable"])):
        np.testing.assert_array_equal(a, b)
    assert np.abs(first["trainable"]["peft"]["0"]["mlp"]["up"]["kernel"]).max() > 0  # trained
    # M x C head + adapter (2 blocks x (32x4 + 4 + 4x32 + 32)) of the Micro ViT
    assert results["trainable_params"] == 32 * 10 + 2 * (32 * 4 + 4 + 4 * 32 + 32)


# ------------------------------------------------- data before a task, the update hook
class ProjectedHead(Finetune):
    """A test method in the manner of InfLoRA / GPM: before each task it builds a subspace
    from the task's inputs (the top-3 eigenvectors of the frozen features' second moment,
    summed on the devices), and its update projects the head's gradient onto it."""
    name = "projected_head"

    def init(self, rng, frozen):
        trainable, _ = super().init(rng, frozen)
        dim = self.backbone.feature_dim
        return trainable, {"projector": jnp.zeros((dim, dim), jnp.float32)}

    def before_task(self, task, trainable, state, frozen, data, rng):
        def second_moment(carry, batch, frozen):
            f = self.backbone.apply(frozen, batch["inputs"], output="cls")
            return carry + (f * batch["mask"][:, None]).T @ f

        dim = self.backbone.feature_dim
        moment = data.reduce(second_moment, jnp.zeros((dim, dim), jnp.float32), frozen)
        basis = np.linalg.eigh(np.asarray(moment, np.float64))[1][:, -3:]
        return trainable, {"projector": jnp.asarray(basis @ basis.T, jnp.float32)}

    def update(self, trainable, state, opt_state, frozen, batch, rng, task, optimizer):
        grads, aux = self.gradients(trainable, state, frozen, batch, rng, task, optimizer)
        grads["head"]["kernel"] = state["projector"] @ grads["head"]["kernel"]
        return self.apply_gradients(trainable, state, opt_state, grads, aux, optimizer)


def test_subspace_from_data_before_the_task_confines_every_update(tmp_path, monkeypatch):
    from pecft_jax import methods
    from pecft_jax.data import pipeline
    monkeypatch.setitem(methods._REGISTRY, "projected_head", f"{__name__}:ProjectedHead")
    config = tiny_config("projected_head", mode="head")
    config.scenario.num_tasks = 2
    config.train.optimizer = "sgd"  # plain SGD: updates are gradients, so they stay projected
    trainer = ContinualTrainer(config, str(tmp_path))
    try:
        results = trainer.run()
        # the task-1 subspace, recomputed in numpy from the task's un-augmented inputs
        task = trainer.tasks[1]
        feature = jax.jit(lambda p, x: trainer.backbone.apply(p, x, output="cls"))
        feats = np.concatenate([
            np.asarray(feature(trainer.frozen, b["inputs"]), np.float64)[b["mask"] > 0]
            for b in pipeline.eval_batches(task.train_source, task.train_indices,
                                           trainer.label_map, batch_size=64,
                                           preprocess=trainer.eval_preprocess)])
        first, second = (trainer.checkpointer.restore("tasks", t) for t in (0, 1))
    finally:
        trainer.close()
    assert trainer.trace_counts["train_step"] == 1  # one compilation serves both tasks
    basis = np.linalg.eigh(feats.T @ feats)[1][:, -3:]
    projector = np.asarray(second["state"]["projector"])
    np.testing.assert_allclose(projector, basis @ basis.T, atol=1e-4)
    delta = (np.asarray(second["trainable"]["head"]["kernel"])
             - np.asarray(first["trainable"]["head"]["kernel"]))
    assert np.abs(delta).max() > 1e-3  # task 1 trained ...
    np.testing.assert_allclose(projector @ delta, delta, atol=1e-5)  # ... inside the subspace
    # the bias is not projected and moved freely
    assert not np.allclose(second["trainable"]["head"]["bias"], first["trainable"]["head"]["bias"])
    assert [len(r) for r in results["accuracy_matrix"]] == [1, 2]


# ---------------------------------------------------------------- lr multipliers by regex
def test_lr_mults_relabel_by_path_and_zero_freezes():
    labels = {"backbone": {"block0": {"w": "train"}, "block1": {"w": "train"}},
              "head": {"kernel": "train"}, "old": {"p": "frozen"}}
    rules = partition.parse_lr_mults([("^backbone/block0/", 0), ("^backbone/", 0.01)])
    new, derived = partition.apply_lr_mults(labels, rules)
    assert new == {"backbone": {"block0": {"w": "frozen"}, "block1": {"w": "train*0.01"}},
                   "head": {"kernel": "train"}, "old": {"p": "frozen"}}
    assert derived == {"train*0.01": ("train", 0.01)}
    with pytest.raises(ValueError, match="regex, multiplier"):
        partition.parse_lr_mults([("^backbone/",)])
    with pytest.raises(ValueError, match="invalid regex"):
        partition.parse_lr_mults([("(", 1.0)])


def test_lr_mults_scale_the_backbone_step_and_frozen_leaves_never_enter_grad(tmp_path):
    config = tiny_config("finetune", mode="full")
    config.scenario.num_tasks = 2
    config.train.optimizer = "sgd"
    config.train.learning_rate = 0.1
    config.train.lr_mults = (("^backbone/Transformer/encoderblock_0/", 0.0),
                             ("^backbone/", 0.01))
    step = first_gradient_step(config, tmp_path)
    trainable, grads, updates = step.trainable, step.grads, step.updates
    block0 = step.learning["backbone"]["Transformer"]["encoderblock_0"]
    assert all(x is None for x in jax.tree_util.tree_leaves(
        block0, is_leaf=lambda x: x is None))  # not differentiated at all
    new, _, _, _ = step.method.apply_gradients(
        trainable, step.state, step.optimizer.init(trainable), grads, step.aux, step.optimizer)
    path = ("backbone", "Transformer", "encoderblock_1", "MlpBlock_3", "Dense_0", "kernel")
    get = lambda tree: tree[path[0]][path[1]][path[2]][path[3]][path[4]][path[5]]
    g = np.asarray(get(grads))
    assert np.abs(g).max() > 0
    np.testing.assert_allclose(get(updates), -0.1 * 0.01 * g, rtol=1e-6)  # SGD at lr x 0.01
    np.testing.assert_allclose(updates["head"]["kernel"], -0.1 * np.asarray(grads["head"]["kernel"]),
                               rtol=1e-6)
    assert not np.array_equal(get(new), get(trainable))
    for a, b in zip(jax.tree_util.tree_leaves(trainable["backbone"]["Transformer"]["encoderblock_0"]),
                    jax.tree_util.tree_leaves(new["backbone"]["Transformer"]["encoderblock_0"])):
        np.testing.assert_array_equal(a, b)


def test_base_optimizer_sgd_weight_decay_is_coupled_and_cosine_steps_per_epoch():
    import ml_collections
    from pecft_jax.train.loop import make_base_optimizer
    cfg = ml_collections.ConfigDict({"learning_rate": 0.1, "optimizer": "sgd", "momentum": 0.0,
                                     "weight_decay": 0.5, "schedule": "cosine_epochs"})
    opt = make_base_optimizer(cfg, total_steps=12, steps_per_epoch=3)  # 4 epochs
    params, grads = jnp.array([2.0, -1.0]), jnp.array([0.3, 0.1])
    state = opt.init(params)
    for step in range(12):
        updates, state = opt.update(grads, state, params)
        lr = 0.1 * 0.5 * (1 + np.cos(np.pi * (step // 3) / 4))  # CosineAnnealingLR per epoch
        # torch.optim.SGD(weight_decay=wd): the step is -lr * (g + wd * p)
        np.testing.assert_allclose(updates, -lr * (np.asarray(grads) + 0.5 * np.asarray(params)),
                                   rtol=1e-6)
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        make_base_optimizer(ml_collections.ConfigDict({"learning_rate": 0.1, "schedule": "step"}), 10)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_betas_and_epsilon_reach_both_adams(name):
    """train.b1 / b2 / eps (transformers.AdamW's epsilon is 1e-6) against a numpy Adam
    with bias correction, AdamW's decoupled decay ``lr * wd * p`` on top; the gradient is
    small enough (1e-6) for epsilon to matter."""
    import ml_collections
    from pecft_jax.train.loop import make_base_optimizer
    lr, wd, b1, b2, eps = 0.01, 0.1, 0.8, 0.99, 1e-6
    cfg = ml_collections.ConfigDict({"learning_rate": lr, "optimizer": name, "b1": b1,
                                     "b2": b2, "eps": eps, "weight_decay": wd,
                                     "schedule": "constant"})
    opt = make_base_optimizer(cfg, total_steps=3)
    p = np.array([2.0, -1.0])
    g = [np.array([3e-6, -1e-6]), np.array([1e-6, 2e-6]), np.array([-2e-6, 1e-6])]
    state, params, m, v = opt.init(jnp.asarray(p)), jnp.asarray(p), 0.0, 0.0
    for t, grad in enumerate(g, 1):
        updates, state = opt.update(jnp.asarray(grad, jnp.float32), state, params)
        step_grad = grad + (wd * p if name == "adam" else 0.0)  # Adam: coupled L2
        m, v = b1 * m + (1 - b1) * step_grad, b2 * v + (1 - b2) * step_grad ** 2
        want = -lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        if name == "adamw":
            want = want - lr * wd * p
        np.testing.assert_allclose(updates, want, rtol=2e-5)
        params = params + updates
        p = np.asarray(params, np.float64)


def test_multistep_epochs_schedule_is_pytorch_multisteplr_per_epoch():
    import ml_collections
    from pecft_jax.train.loop import make_base_optimizer
    cfg = ml_collections.ConfigDict({"learning_rate": 0.01, "optimizer": "sgd", "momentum": 0.0,
                                     "schedule": "multistep_epochs", "milestones": (2, 4),
                                     "lr_decay": 0.1})
    opt = make_base_optimizer(cfg, total_steps=15, steps_per_epoch=3)  # 5 epochs
    params, grads = jnp.array([1.0]), jnp.array([1.0])
    state = opt.init(params)
    for step in range(15):
        updates, state = opt.update(grads, state, params)
        epoch = step // 3  # MultiStepLR(milestones=[2, 4], gamma=0.1), stepped per epoch
        lr = 0.01 * 0.1 ** sum(epoch >= m for m in (2, 4))
        np.testing.assert_allclose(updates, [-lr], rtol=1e-6)


def test_coda_cosine_schedule_is_the_official_cosineschedule_as_it_runs():
    """CODA-Prompt's / InfLoRA's CosineSchedule: its constructor applies epoch 0, then resets
    last_epoch to -1, so the first scheduler.step() (after epoch 0) applies epoch 0 again."""
    import math
    import ml_collections
    from pecft_jax.train.loop import make_base_optimizer
    cfg = ml_collections.ConfigDict({"learning_rate": 5e-4, "optimizer": "sgd", "momentum": 0.0,
                                     "schedule": "coda_cosine"})
    epochs, per_epoch = 5, 2
    opt = make_base_optimizer(cfg, total_steps=epochs * per_epoch, steps_per_epoch=per_epoch)
    state, params = opt.init(jnp.array([1.0])), jnp.array([1.0])
    last_epoch = 0  # what the torch scheduler holds while an epoch runs
    for epoch in range(epochs):
        lr = 5e-4 * math.cos(99 * math.pi * last_epoch / (200 * (epochs - 1)))
        for _ in range(per_epoch):
            updates, state = opt.update(jnp.array([1.0]), state, params)
            np.testing.assert_allclose(updates, [-lr], rtol=1e-6)
        last_epoch = epoch  # scheduler.step() after the epoch: -1 + 1 = 0, then 1, 2, ...


def test_timm_cosine_is_timms_scheduler_stepped_as_hide_prompt_steps_it():
    """timm's CosineLRScheduler sets epoch t's rate min + (lr - min)(1 + cos(pi t / T)) / 2;
    the DualPrompt-PyTorch lineage calls scheduler.step(epoch) *after* epoch ``epoch``, so the
    rate of epoch e + 1 is timm's t = e, and epoch 0 runs at the initial t = 0."""
    import math
    import ml_collections
    from pecft_jax.train.loop import make_base_optimizer
    cfg = ml_collections.ConfigDict({"learning_rate": 0.01, "optimizer": "sgd", "momentum": 0.0,
                                     "schedule": "timm_cosine", "min_lr": 1e-3})
    epochs, per_epoch = 6, 2
    opt = make_base_optimizer(cfg, total_steps=epochs * per_epoch, steps_per_epoch=per_epoch)
    state, params = opt.init(jnp.array([1.0])), jnp.array([1.0])
    timm_t = 0  # the scheduler's epoch while an epoch runs
    for epoch in range(epochs):
        lr = 1e-3 + 0.5 * (0.01 - 1e-3) * (1 + math.cos(math.pi * timm_t / epochs))
        for _ in range(per_epoch):
            updates, state = opt.update(jnp.array([1.0]), state, params)
            np.testing.assert_allclose(updates, [-lr], rtol=1e-6)
        timm_t = epoch  # lr_scheduler.step(epoch) after the epoch


def test_joint_on_a_domain_scenario_fails_clearly(tmp_path):
    config = tiny_config("finetune", mode="head")
    config.scenario.kind = "domain"
    config.scenario.num_tasks = 2
    config.scenario.domains = ["digits", "digits+rotate90"]
    config.scenario.class_order = "identity"
    config.scenario.joint = True
    with pytest.raises(ValueError, match="scenario.joint=True needs every task to read one"):
        train_and_evaluate(config, str(tmp_path))


@pytest.mark.slow
def test_resume_inside_a_task_with_a_stateless_optimizer_skips_before_task(tmp_path, monkeypatch):
    """Plain SGD keeps no optimizer arrays; a run resumed inside task 0 (RanPAC's phase 1)
    must still continue past before_task, and end where the uninterrupted run ends."""
    from pecft_jax.methods.ranpac import RanPAC

    def config():
        c = tiny_config("ranpac", M=32, adapter={"bottleneck_dim": 4}, ridges=(1e-2, 1.0, 1e2))
        c.scenario.num_tasks = 2
        c.train.optimizer = "sgd"  # momentum 0, constant rate: an optimizer state of no arrays
        c.train.epochs = 2
        return c

    whole = train_and_evaluate(config(), str(tmp_path / "whole"))
    undo = crash_at_training_batch(monkeypatch, 20)  # inside task 0, after step 18's checkpoint
    with pytest.raises(Interrupted):
        train_and_evaluate(config(), str(tmp_path / "resumed"))
    undo()
    seen = []
    real_before = RanPAC.before_task

    def spy(self, task, *args):
        seen.append(task.index)
        return real_before(self, task, *args)

    monkeypatch.setattr(RanPAC, "before_task", spy)
    resumed = train_and_evaluate(config(), str(tmp_path / "resumed"))
    assert seen == [1]  # task 0 resumed at its checkpointed step, past its before_task
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert_same_task_checkpoint(tmp_path / "whole", tmp_path / "resumed", 1)


EXPERIMENT_CONFIGS = [
    ("l2p", a) for a in ("split_mnist", "cifar100", "cifar100_paper", "imagenet_r",
                         "5datasets")] + [
    (m, a) for m in ("dualprompt", "coda_prompt", "hide_prompt")
    for a in ("split_mnist", "cifar100", "imagenet_r")] + [
    ("s_prompts", "domain_mnist"), ("s_prompts", "domainnet"),
    ("finetune", "split_mnist"), ("finetune", "split_mnist,lora"),
    ("finetune", "split_mnist,full,joint"), ("finetune", "cifar100,adapter")] + [
    (m, a) for m in ("simplecil", "ranpac")
    for a in ("split_mnist", "domain_mnist", "cifar100", "imagenet_r")] + [
    (m, a) for m in ("ease", "slca", "ssiat")
    for a in ("split_mnist", "cifar100", "imagenet_r")] + [
    ("aper", f"{b},{v}") for b in ("split_mnist", "cifar100", "imagenet_r")
    for v in ("adapter", "ssf", "vpt_deep", "vpt_shallow", "finetune")] + [
    (m, a) for m in ("inflora", "sd_lora", "o_lora")
    for a in ("split_mnist", "cifar100", "imagenet_r")] + [
    ("sd_lora", "imagenet_r,rr"), ("sd_lora", "cifar100,paper")] + [
    ("lae", f"{b},{m}") for b in ("split_mnist", "cifar100", "imagenet_r")
    for m in ("adapter", "lora", "prefix")]


@pytest.mark.parametrize("name, arg", EXPERIMENT_CONFIGS)
def test_experiment_configs_hold_every_method_field_for_the_command_line(name, arg):
    """Each file sets only what differs from the method's Config; loading fills in the rest,
    so every field can be overridden with --config.method.<field>=..."""
    from helpers import load_experiment_config
    c = load_experiment_config(name, arg)
    cls = get_method_class(c.method.name).Config
    assert set(c.method) == {"name"} | {f.name for f in dataclasses.fields(cls)}
    resolved = parse_config(cls, c.method, "config.method")
    assert _as_dict_tree(c.method, skip="name") == _as_dict_tree(dataclasses.asdict(resolved))


def _as_dict_tree(tree, skip=None):
    tree = tree.to_dict() if hasattr(tree, "to_dict") else tree
    return {k: (_as_dict_tree(v) if isinstance(v, dict) else
                tuple(v) if isinstance(v, list) else v)
            for k, v in tree.items() if k != skip}


def test_a_misspelt_key_in_a_config_file_fails_when_it_loads():
    from pecft_jax.configs import benchmark, with_method_defaults
    c = benchmark("split_mnist")
    c.method.name = "ranpac"
    c.method.first_sesion = "ssf"
    with pytest.raises(ValueError, match=r"\['first_sesion'\]"):
        with_method_defaults(c)


def test_warmup_cosine_with_traced_lengths_gives_optaxs_values_exactly():
    """The 'cosine' schedule takes the task's steps as a traced int32 (one train step for
    tasks of every length); every rate equals optax's warmup_cosine_decay_schedule's, bit
    for bit, with and without warm-up, in and out of jit."""
    import optax
    from pecft_jax.methods.statistics import warmup_cosine_schedule
    counts = jnp.arange(0, 60, dtype=jnp.int32)
    for init, warmup, decay in ((0.05, 0, 37), (0.0, 5, 41), (0.0, 9, 10)):
        reference = optax.warmup_cosine_decay_schedule(init, 0.05, warmup, decay)
        expected = np.asarray(jax.jit(jax.vmap(reference))(counts))
        traced = jax.jit(jax.vmap(lambda c, d: warmup_cosine_schedule(init, 0.05, warmup, d)(c),
                                  in_axes=(0, None)))(counts, jnp.int32(decay))
        np.testing.assert_array_equal(np.asarray(traced), expected)
        eager = [float(warmup_cosine_schedule(init, 0.05, warmup, decay)(c)) for c in (0, 7, 50)]
        np.testing.assert_array_equal(eager, expected[[0, 7, 50]])


@pytest.mark.parametrize("schedule", ["cosine", "cosine_epochs", "coda_cosine", "timm_cosine",
                                      "multistep_epochs"])
def test_one_compiled_update_serves_tasks_of_any_length(schedule):
    """make_base_optimizer keeps the schedule's lengths in the optimizer state: an update
    compiled for one task's optimizer, given another task's state, steps on the other task's
    schedule -- the same updates, exactly, as that task's own optimizer run eagerly."""
    import ml_collections
    from pecft_jax.train.loop import make_base_optimizer
    cfg = ml_collections.ConfigDict({"learning_rate": 0.05, "optimizer": "adam",
                                     "schedule": schedule, "min_lr": 1e-3,
                                     "milestones": (1, 2), "lr_decay": 0.1})
    params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([0.5])}
    grads = {"w": jnp.array([0.3, 0.1]), "b": jnp.array([-0.2])}
    first = make_base_optimizer(cfg, total_steps=12, steps_per_epoch=4)
    compiled = jax.jit(first.update)
    for total, per_epoch in ((12, 4), (10, 5), (21, 3)):
        own = make_base_optimizer(cfg, total_steps=total, steps_per_epoch=per_epoch)
        state_own = state_shared = own.init(params)
        for _ in range(total):
            expected, state_own = jax.jit(own.update)(grads, state_own, params)
            got, state_shared = compiled(grads, state_shared, params)
            for leaf_got, leaf_expected in zip(jax.tree_util.tree_leaves(got),
                                               jax.tree_util.tree_leaves(expected)):
                np.testing.assert_array_equal(leaf_got, leaf_expected)
    assert compiled._cache_size() == 1  # one program for every length
    # and the rates from traced lengths are those of the lengths as compiled-in constants
    from pecft_jax.train.loop import schedule_lengths, schedule_of_lengths
    counts = jnp.arange(30, dtype=jnp.int32)
    for total, per_epoch in ((12, 4), (21, 3)):
        lengths = schedule_lengths(cfg, total, per_epoch)
        constant = jax.jit(jax.vmap(schedule_of_lengths(cfg, lengths)))(counts)
        traced = jax.jit(lambda c, *n: jax.vmap(schedule_of_lengths(cfg, n))(c))(
            counts, *(jnp.int32(n) for n in lengths))
        np.testing.assert_array_equal(np.asarray(traced), np.asarray(constant))


def test_matmul_precision_is_the_precision_every_traced_pass_sees(tmp_path, monkeypatch):
    """matmul_precision='highest': the train step's loss, the method's after-task work and
    the evaluation's logits -- in the run and in pecft_jax.evaluate of its checkpoint --
    see it (on a GPU, float32 matmuls without TF32); the default leaves JAX's own; a name
    JAX does not know is refused before anything runs; the setting is part of the config
    hash only when set (older runs resume)."""
    from pecft_jax.evaluate import evaluate_checkpoint
    from pecft_jax.train.loop import config_hash
    seen = {}

    def spy(name, original):
        def wrapped(self, *args, **kwargs):
            seen.setdefault(name, set()).add(jax.config.jax_default_matmul_precision)
            return original(self, *args, **kwargs)
        monkeypatch.setattr(Finetune, name, wrapped)

    for name in ("loss", "logits", "after_task"):
        spy(name, getattr(Finetune, name))
    c = tiny_config("finetune")
    c.scenario.num_tasks = 2
    c.matmul_precision = "highest"
    train_and_evaluate(c, str(tmp_path / "highest"))
    assert seen == {"loss": {"highest"}, "logits": {"highest"}, "after_task": {"highest"}}
    seen.clear()
    evaluate_checkpoint(str(tmp_path / "highest"))
    assert seen == {"logits": {"highest"}}
    seen.clear()
    c.matmul_precision = "default"
    train_and_evaluate(c, str(tmp_path / "default"))
    assert seen == {"loss": {None}, "logits": {None}, "after_task": {None}}
    unset, highest = tiny_config("finetune"), tiny_config("finetune")
    del unset["matmul_precision"]  # a config from before the option existed
    highest.matmul_precision = "highest"
    for config in (unset, highest):
        config.scenario.num_tasks = 2
    assert config_hash(unset) == config_hash(c) != config_hash(highest)
    c.matmul_precision = "fp32"
    with pytest.raises(ValueError, match=r"config matmul_precision must be one of .*'highest'"):
        train_and_evaluate(c, str(tmp_path / "bad"))
