"""Defaults every experiment config starts from (``experiments/configs/*.py`` override them).

A config is an ``ml_collections.ConfigDict``; a config file defines ``get_config(arg=None)``
and is passed as ``--config path.py[:arg]``, with ``--config.key=value`` overrides.
"""
from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.progress_bar = True
    c.num_devices = ml_collections.FieldReference(None, field_type=int)  # None = all local
    c.distributed = False  # call jax.distributed.initialize (multi-host jobs)

    c.backbone = ml_collections.ConfigDict()
    c.backbone.checkpoint = "demo"  # path, 'demo', or 'random:<ViT name>'
    c.backbone.image_size = ml_collections.FieldReference(None, field_type=int)
    c.backbone.mean = (0.5,)  # inputs are (x/255 - mean) / std, per channel
    c.backbone.std = (0.5,)

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "mnist5k"
    c.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)

    c.scenario = ml_collections.ConfigDict()
    c.scenario.kind = "class"  # 'class' | 'task' | 'domain'
    c.scenario.num_tasks = 5
    c.scenario.first_task_classes = ml_collections.FieldReference(None, field_type=int)
    c.scenario.class_order = "seed"  # 'seed' or an explicit list of class ids
    c.scenario.seed = 1993  # the class-order seed used by the field's CIFAR-100 splits

    c.augment = ml_collections.ConfigDict()
    c.augment.enabled = False
    c.augment.crop_padding = 0
    c.augment.flip = False

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 1
    c.train.batch_size = 64
    c.train.optimizer = "adam"
    c.train.learning_rate = 1e-3
    c.train.schedule = "constant"
    c.train.warmup_steps = 0
    c.train.grad_clip_norm = ml_collections.FieldReference(None, field_type=float)
    c.train.checkpoint_every_steps = 200
    c.train.log_every_steps = 20

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 256

    c.method = ml_collections.ConfigDict()
    c.method.name = "l2p"
    return c
