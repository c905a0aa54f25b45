"""The paper configs hold the official codes' values, and their data protocol
(random-resized crops, centre crops, squash, brightness, resampling filters, class order)
runs end to end."""
import jax
import numpy as np
import pytest

from pecft_jax.methods.base import init_linear_head
from pecft_jax.train.loop import train_and_evaluate

from helpers import load_experiment_config

# (config, arg) -> {dotted key: official value}. Sources:
#   L2P / DualPrompt: google-research/l2p @dd8836e configs/{cifar100_l2p,five_datasets_l2p,
#     cifar100_dualprompt,imr_dualprompt}.py (global batch = per-device batch x 8 devices,
#     lr = config lr x batch / 256, train_continual.py:637-639), input_pipeline.py
#   CODA-Prompt: GT-RIPL/CODA-Prompt @6417d4f configs/{cifar-100,imnet-r}_prompt.yaml,
#     experiments/*.sh (--prompt_param 100 8 0.0), dataloaders/utils.py:28-65
#   HiDe-Prompt: thu-ml/HiDe-Prompt @0ed4333 training_scripts/train_{cifar100,imr}_vit.sh,
#     configs/{cifar100,imr}_hideprompt_5e.py (argparse-resolved), datasets.py
#   S-Prompts: iamwangyabin/S-Prompts @a26e822 configs/domainnet_slip.json (net_type sip),
#     methods/sprompt.py, utils/data.py:108-119
#   PyCIL lineage, transforms: utils/data.py build_transform of zhoudw-zdw/RevisitingCIL
#     (SimpleCIL, APER), EASE, SSIAT, SD-LoRA (LAMDA-PILOT's) and RanPAC/RanPAC (isCifar:
#     Resize(224)); SLCA utils/data.py:35-65,124-149; InfLoRA utils/data.py:111-244; LAE
#     main.py:38-43. "interpolation=3" is PIL's bicubic; torchvision's default bilinear.
OFFICIAL_DATA = {"augment.random_resized_crop": True, "augment.flip": True,
                 "augment.crop_padding": 0, "scenario.class_order": "identity",
                 "augment.crop_sampler": "torchvision"}
L2P_DATA = dict(OFFICIAL_DATA, **{"backbone.mean": (0.0,), "backbone.std": (1.0,),
                                  "augment.crop_scale": (0.05, 1.0), "eval.resize_short": 256,
                                  "eval.squash": True, "backbone.gelu_approximate": True,
                                  "backbone.checkpoint": "weights/ViT-B_16.npz",
                                  "dataset.resample": "bilinear",  # tf.image.resize
                                  # tf.image.stateless_sample_distorted_bounding_box
                                  "augment.crop_sampler": "tf",
                                  "augment.crop_ratio": (0.75, 1.33)})
PYCIL_DATA = {"augment.enabled": True, "augment.random_resized_crop": True,
              "augment.flip": True, "augment.crop_padding": 0, "augment.crop_scale": (0.05, 1.0),
              "augment.crop_resample": "pil_bilinear", "augment.brightness": 0.0,
              "dataset.resample": "pil_bicubic", "eval.resize_short": 256,
              "backbone.mean": (0.0,), "backbone.std": (1.0,), "backbone.gelu_approximate": False,
              "scenario.class_order": "pycil", "scenario.seed": 1993}
# SLCA / InfLoRA / LAE: torchvision's default crop scale; their own filters and norms
OWN_CROPS = dict(PYCIL_DATA, **{"augment.crop_scale": (0.08, 1.0)})
OFFICIAL = {
    ("l2p", "cifar100"): dict(L2P_DATA, **{
        "method.pool_size": 10, "method.prompt_length": 10, "method.top_k": 4,
        "method.pull_constraint": 1.0, "method.batchwise_prompt": True,
        "method.batchwise_group": 16, "method.prompt_init": "small_uniform",
        "method.key_init": "small_uniform", "method.head_init": "zeros",
        "method.head_input": "prompt", "method.use_prompt_mask": False,
        "method.shared_prompt_pool": False, "train.optimizer": "adam", "train.schedule": "constant",
        "train.batch_size": 128, "train.learning_rate": 0.015, "train.epochs": 5,
        "train.grad_clip_norm": 1.0, "train.weight_decay": 0.0}),
    ("l2p", "cifar100_paper"): {  # the first release, 8cfb210
        "method.prompt_length": 5, "method.top_k": 5, "method.pull_constraint": 0.1},
    ("l2p", "5datasets"): dict(L2P_DATA, **{
        "method.pool_size": 20, "method.prompt_length": 10, "method.top_k": 4,
        "method.pull_constraint": 0.5, "method.use_prompt_mask": True,
        "method.shared_prompt_pool": True,
        "scenario.datasets": ["tfds:cifar10", "tfds:mnist", "tfds:svhn_cropped",
                              {"name": "tfds:not_mnist", "train_split": "train[:80%]",
                               "test_split": "train[80%:]"}, "tfds:fashion_mnist"]}),
    ("dualprompt", "cifar100"): dict(L2P_DATA, **{
        "method.g_prompt_length": 5, "method.g_layers": (0, 1), "method.e_layers": (2, 3, 4),
        "method.e_prompt_length": 5, "method.pull_constraint": 1.0,
        "method.batchwise_prompt": True, "method.batchwise_group": 24,
        "method.prompt_init": "small_uniform", "method.key_init": "small_uniform",
        "method.head_init": "zeros", "train.batch_size": 192, "eval.batch_size": 192,
        "train.learning_rate": 0.0225, "train.epochs": 5, "train.schedule": "constant",
        "train.grad_clip_norm": 1.0}),
    ("dualprompt", "imagenet_r"): dict(L2P_DATA, **{
        "method.e_prompt_length": 20, "method.batchwise_prompt": False,
        "train.batch_size": 192, "train.learning_rate": 0.00375, "train.epochs": 50,
        "dataset.train_split": "test[:80%]", "dataset.test_split": "test[80%:]"}),
    ("coda_prompt", "cifar100"): dict(OFFICIAL_DATA, **{
        "method.pool_size": 100, "method.prompt_length": 8, "method.ortho_mu": 0.0,
        "method.orthogonalize": "official",
        "method.layers": (0, 1, 2, 3, 4), "train.optimizer": "adam",
        "train.learning_rate": 0.001, "train.schedule": "coda_cosine", "train.batch_size": 128,
        "train.epochs": 20, "train.weight_decay": 0.0, "backbone.mean": (0.0,),
        "backbone.std": (1.0,), "augment.crop_scale": (0.08, 1.0), "eval.resize_short": None,
        "backbone.gelu_approximate": False, "dataset.resample": "pil_bilinear",
        "augment.crop_resample": None}),
    ("coda_prompt", "imagenet_r"): dict(OFFICIAL_DATA, **{
        "train.epochs": 50, "eval.resize_short": 256, "train.schedule": "coda_cosine",
        "method.orthogonalize": "official"}),
    ("hide_prompt", "cifar100"): dict(OFFICIAL_DATA, **{
        "method.prompt_length": 5, "method.contrastive_weight": 0.1,
        "method.contrastive_group": 24,
        "method.contrastive_temperature": 0.8, "method.prompt_momentum": 0.01,
        "method.statistics": "multi_centroid", "method.n_centroids": 10,
        "method.align_weight_decay": 0.0, "method.skip_zero_variance": True,
        "method.head_init": "trunc_normal", "method.tii_init": "trunc_normal",
        "method.tii_epochs": 20, "method.tap_lr": 0.005, "method.tap_samples": 120,
        "method.tii_align_samples": 24, "method.tii_drop_last": False, "train.batch_size": 192,
        "train.learning_rate": 0.03 * 24 / 256, "train.epochs": 50,
        "train.schedule": "multistep_epochs", "train.milestones": (31,), "train.lr_decay": 0.1,
        "train.grad_clip_norm": 1.0, "backbone.mean": (0.5071, 0.4867, 0.4408),
        "backbone.std": (0.2675, 0.2565, 0.2761), "augment.brightness": 63 / 255,
        "augment.crop_scale": (0.08, 1.0), "eval.resize_short": 256, "seed": 42,
        "backbone.gelu_approximate": False, "dataset.resample": "pil_bicubic",
        "augment.crop_resample": "pil_bicubic"}),
    ("hide_prompt", "imagenet_r"): dict(OFFICIAL_DATA, **{
        "method.prompt_length": 20, "method.contrastive_weight": 0.5, "train.epochs": 150,
        "method.contrastive_group": 24,
        "train.schedule": "timm_cosine", "train.min_lr": 1e-5, "backbone.mean": (0.0,),
        "augment.crop_scale": (0.05, 1.0), "augment.brightness": 0.0,
        "dataset.resample": "pil_bicubic", "augment.crop_resample": "pil_bilinear"}),
    ("s_prompts", "domainnet"): dict(OFFICIAL_DATA, **{
        "method.prompt_length": 10, "method.num_centroids": 5, "method.distance": "l1",
        "method.kmeans_on_augmented": True, "method.first_weight_decay": 5e-4,
        "method.weight_decay": 2e-4, "train.optimizer": "sgd", "train.momentum": 0.9,
        "train.learning_rate": 0.01, "train.schedule": "cosine_epochs", "train.epochs": 30,
        "train.batch_size": 128, "backbone.mean": (0.485, 0.456, 0.406),
        "backbone.std": (0.229, 0.224, 0.225), "eval.resize_short": 256,
        "backbone.gelu_approximate": False, "dataset.resample": "pil_bilinear"}),
    ("simplecil", "cifar100"): dict(PYCIL_DATA, **{"augment.enabled": False}),
    ("aper", "cifar100,adapter"): PYCIL_DATA,
    ("aper", "imagenet_r,adapter"): PYCIL_DATA,
    ("ease", "cifar100"): PYCIL_DATA,
    ("ease", "imagenet_r"): PYCIL_DATA,
    ("ssiat", "cifar100"): PYCIL_DATA,
    ("ssiat", "imagenet_r"): PYCIL_DATA,
    ("sd_lora", "cifar100"): PYCIL_DATA,
    ("sd_lora", "imagenet_r"): dict(PYCIL_DATA, **{"scenario.seed": 1995}),
    ("ranpac", "cifar100"): dict(PYCIL_DATA, **{"eval.resize_short": 224}),
    ("ranpac", "imagenet_r"): PYCIL_DATA,
    ("slca", "cifar100"): dict(OWN_CROPS, **{
        "augment.crop_resample": "pil_bicubic", "augment.brightness": 63 / 255,
        "backbone.mean": (0.5071, 0.4867, 0.4408), "backbone.std": (0.2675, 0.2565, 0.2761)}),
    ("slca", "imagenet_r"): dict(OWN_CROPS, **{
        "augment.crop_resample": "pil_bicubic", "backbone.mean": (0.485, 0.456, 0.406),
        "backbone.std": (0.229, 0.224, 0.225)}),
    ("inflora", "cifar100"): dict(OWN_CROPS, **{
        "dataset.resample": "pil_bilinear", "eval.resize_short": 224,
        "scenario.class_order": "identity"}),
    ("inflora", "imagenet_r"): dict(OWN_CROPS, **{
        "dataset.resample": "pil_bilinear", "scenario.class_order": "identity"}),
    ("lae", "cifar100"): {k: v for k, v in dict(OWN_CROPS, **{
        "dataset.resample": "pil_bilinear", "augment.crop_resample": None,
        "scenario.class_order": "identity"}).items() if k != "scenario.seed"},
}

# train.drop_last: whether the official training loader drops an epoch's last partial batch
DROP_LAST = {
    "l2p": True, "dualprompt": True,  # clu create_dataset's drop_remainder=True default
    # (libml/input_pipeline.py:541-553)
    "coda_prompt": True,  # trainer.py:185 drop_last=True
    "lae": True,  # libml/data/dataloader.py:15,27
    # DataLoader's default drop_last=False: HiDe-Prompt datasets.py:107-112, S-Prompts
    # methods/sprompt.py:62-63, the PyCIL lineage (APER models/aper_adapter.py:77, EASE
    # models/ease.py:237, SSIAT models/SSITA_adapter.py:73, SD-LoRA models/sdlora.py:45-47,
    # RanPAC RanPAC.py:166, SLCA models/slca.py:98, InfLoRA methods/inflora.py:75-76),
    # Progressive Prompts BERT_codebase/dataset_utils.py:178; O-LoRA: HF Trainer's
    # dataloader_drop_last=False
    **dict.fromkeys(("hide_prompt", "s_prompts", "simplecil", "aper", "ease", "ssiat",
                     "sd_lora", "ranpac", "slca", "inflora", "progressive_prompts", "o_lora"),
                    False),
}


@pytest.mark.parametrize("name, arg", sorted(set(OFFICIAL) | {
    ("o_lora", "cifar100"), ("progressive_prompts", "bert_order4")}))
def test_paper_configs_keep_or_drop_the_last_partial_batch_as_the_official_loader(name, arg):
    c = load_experiment_config(name, arg)
    assert c.train.drop_last is DROP_LAST[name]
    # clu's create_dataset (shuffle, repeat, batch): the JAX code's batches cross epochs
    assert c.train.batches_cross_epochs is (name in ("l2p", "dualprompt"))
    # Progressive Prompts' BERT loader reads one order, shuffled once (dataset_utils.py:256)
    assert c.train.reshuffle_each_epoch is (name != "progressive_prompts")


@pytest.mark.parametrize("name", sorted(DROP_LAST))
def test_the_demos_drop_the_last_partial_batch(name):
    """The demos keep the library's default (their README figures were measured so)."""
    arg = "wordnet" if name == "progressive_prompts" else (
        "domain_mnist" if name == "s_prompts" else "split_mnist")
    c = load_experiment_config(name, arg)
    assert c.train.drop_last is True and c.train.batches_cross_epochs is False
    assert c.train.reshuffle_each_epoch is True
    assert c.train.optimizer_scope == "task"  # a fresh optimizer per task


def _get(config, dotted):
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


@pytest.mark.parametrize("name, arg", sorted(OFFICIAL))
def test_paper_configs_hold_the_official_values(name, arg):
    c = load_experiment_config(name, arg)
    for key, expected in OFFICIAL[(name, arg)].items():
        got = _get(c, key)
        if isinstance(expected, float):
            assert got == pytest.approx(expected), key
        elif isinstance(expected, (tuple, list)):
            assert tuple(got) == tuple(expected), key
        else:
            assert got == expected, key


def test_head_initialisations_have_their_distributions():
    key = jax.random.key(0)
    torch_like = init_linear_head(key, 400, 300)
    bound = 1 / np.sqrt(400)  # nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias too
    for leaf in (torch_like["kernel"], torch_like["bias"]):
        leaf = np.asarray(leaf)
        assert np.abs(leaf).max() <= bound and leaf.min() < -0.9 * bound
    assert np.asarray(torch_like["kernel"]).std() == pytest.approx(bound / np.sqrt(3), rel=0.02)
    zeros = init_linear_head(key, 400, 300, "zeros")
    assert not np.asarray(zeros["kernel"]).any() and not np.asarray(zeros["bias"]).any()
    normal = init_linear_head(key, 400, 300, "trunc_normal")
    kernel = np.asarray(normal["kernel"])
    assert kernel.std() == pytest.approx(0.02, rel=0.02) and abs(kernel.mean()) < 1e-3
    assert np.mean(np.abs(kernel) > 0.04) == pytest.approx(0.0455, abs=0.003)  # 2 sd tails
    assert not np.asarray(normal["bias"]).any()
    with pytest.raises(ValueError, match="unknown head init"):
        init_linear_head(key, 4, 3, "xavier")


def tiny_official_run(name, arg, workdir, **overrides):
    """A paper config with its data protocol and method options, on the bundled digits
    and a random ViT-Micro/4 (16 x 16 inputs), one short epoch per task."""
    c = load_experiment_config(name, arg)
    c.progress_bar = False
    c.compilation_cache_dir = ""
    c.backbone.checkpoint = "random:ViT-Micro/4"
    c.backbone.image_size = 16
    # the micro ViT reads grey images: the first channel's normalisation
    c.backbone.mean, c.backbone.std = tuple(c.backbone.mean)[:1], tuple(c.backbone.std)[:1]
    c.dataset.name = "digits"
    c.dataset.data_dir = None
    c.scenario.num_tasks = 2
    c.scenario.first_task_classes = None
    c.eval.resize_short = 20 if c.eval.resize_short else None
    c.train.epochs = 1
    c.train.batch_size = 32
    c.train.checkpoint_every_steps = 0
    c.eval.batch_size = 64
    for key, value in overrides.items():
        section, field = key.split(".")
        c[section][field] = value
    return train_and_evaluate(c, str(workdir))


@pytest.mark.parametrize("name, arg, overrides", [
    ("l2p", "cifar100", {"method.batchwise_group": 8}),
    pytest.param("hide_prompt", "cifar100", {
        "method.tii_epochs": 1, "method.tii_align_epochs": 1, "method.tap_epochs": 1,
        "method.prompt_layers": (0, 1), "method.tii_batch_size": 32, "method.n_centroids": 2,
        "train.milestones": (1,), "method.contrastive_group": 8}, marks=pytest.mark.slow),
    ("ranpac", "cifar100", {"method.M": 256}),  # PIL crops (bilinear) and tests (bicubic)
])
def test_paper_configs_run_with_their_data_protocol(tmp_path, name, arg, overrides):
    results = tiny_official_run(name, arg, tmp_path, **overrides)
    assert len(results["accuracy_matrix"]) == 2
    assert np.all(np.isfinite(results["accuracy_matrix"][-1]))
    if name == "ranpac":  # PyCIL's np.random.seed(1993); np.random.permutation
        np.random.seed(1993)
        assert results["class_order"] == np.random.permutation(10).tolist()
    else:
        assert results["class_order"] == list(range(10))  # the official codes' identity order
    assert results["config"]["augment"]["random_resized_crop"] is True
