"""One PEFT module chosen by name: what "fine-tune with an adapter / SSF / VPT / LoRA"
means for the methods that let a config pick the module (sequential fine-tuning, RanPAC's
and APER's first-session adaptation).

A method's config holds one settings dataclass per kind (``lora: LoraConfig``,
``adapter: AdapterConfig``, ``ssf: SSFConfig``, ``prompt: PromptConfig``) and a kind name;
``init_module(kind, settings, ...)`` and ``module_context(kind, settings, params)`` do the rest.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax

from pecft_jax.backbones.context import PEFTContext
from pecft_jax.backbones.vit import ViTConfig
from pecft_jax.peft.adapters import AdapterConfig, adapter_context, init_adapters
from pecft_jax.peft.lora import LoraConfig, init_lora, lora_context
from pecft_jax.peft.prompts import PromptConfig, init_prompts, prompt_context
from pecft_jax.peft.ssf import SSFConfig, init_ssf, ssf_context

# kind -> (settings class, init, context)
_KINDS = {
    "lora": (LoraConfig, init_lora, lora_context),
    "adapter": (AdapterConfig, init_adapters, adapter_context),
    "ssf": (SSFConfig, init_ssf, ssf_context),
    "prompt": (PromptConfig, init_prompts, prompt_context),
}
MODULE_KINDS = tuple(_KINDS)


def _entry(kind: str, settings: Any) -> tuple:
    if kind not in _KINDS:
        raise ValueError(f"unknown PEFT module {kind!r}; use one of {MODULE_KINDS}")
    entry = _KINDS[kind]
    if not isinstance(settings, entry[0]):
        raise TypeError(f"PEFT module {kind!r} needs a {entry[0].__name__}, got "
                        f"{type(settings).__name__}")
    return entry


def init_module(kind: str, settings: Any, cfg: ViTConfig, rng: jax.Array) -> dict:
    """Fresh parameters of PEFT module ``kind`` (the adapted model starts as the base one,
    except for prompts, which add tokens)."""
    return _entry(kind, settings)[1](cfg, settings, rng)


def module_context(kind: str, settings: Any, params: Mapping) -> PEFTContext:
    """The backbone context of PEFT module ``kind`` with parameters ``params``."""
    return _entry(kind, settings)[2](params, settings)
