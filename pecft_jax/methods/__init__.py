"""Continual methods, by name. Each is one short file over the shared loop."""
from __future__ import annotations

import importlib

from pecft_jax.methods.base import Method, TaskData, TaskSpec

# name -> "module:Class"; imported lazily so a method's extra imports cost nothing elsewhere.
_REGISTRY = {
    "finetune": "pecft_jax.methods.finetune:Finetune",
    "l2p": "pecft_jax.methods.l2p:L2P",
    "dualprompt": "pecft_jax.methods.dualprompt:DualPrompt",
    "coda_prompt": "pecft_jax.methods.coda_prompt:CodaPrompt",
    "hide_prompt": "pecft_jax.methods.hide_prompt:HiDePrompt",
    "s_prompts": "pecft_jax.methods.s_prompts:SPrompts",
    "simplecil": "pecft_jax.methods.simplecil:SimpleCIL",
    "ranpac": "pecft_jax.methods.ranpac:RanPAC",
    "aper": "pecft_jax.methods.aper:APER",
    "ease": "pecft_jax.methods.ease:EASE",
    "slca": "pecft_jax.methods.slca:SLCA",
    "ssiat": "pecft_jax.methods.ssiat:SSIAT",
    "inflora": "pecft_jax.methods.inflora:InfLoRA",
    "sd_lora": "pecft_jax.methods.sd_lora:SDLoRA",
    "o_lora": "pecft_jax.methods.o_lora:OLoRA",
    "lae": "pecft_jax.methods.lae:LAE",
    "progressive_prompts": "pecft_jax.methods.progressive_prompts:ProgressivePrompts",
}


def available() -> tuple:
    return tuple(sorted(_REGISTRY))


def get_method_class(name: str) -> type:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; available methods: {', '.join(available())} "
                         f"(set config.method.name)")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def create_method(name: str, config, backbone, num_classes: int, num_tasks: int) -> Method:
    return get_method_class(name)(config, backbone, num_classes, num_tasks)


__all__ = ["Method", "TaskData", "TaskSpec", "available", "create_method", "get_method_class"]
