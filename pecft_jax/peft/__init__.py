"""Reusable parameter-efficient pieces: LoRA, adapters, prompt/prefix tuning, SSF and
prompt pools. Each has an ``init_*`` returning a plain-dict trainable pytree and a
``*_context`` turning that pytree into the :class:`PEFTContext` the backbone consumes."""
from pecft_jax.peft.adapters import AdapterConfig, adapter_context, init_adapters
from pecft_jax.backbones.context import LayerPEFT, PEFTContext
from pecft_jax.peft.lora import (LoraConfig, init_lora, lora_context, merge_lora,
                                 resolve_targets, unmerge_lora)
from pecft_jax.peft.prompt_pool import (batch_mean, cosine_similarity, gather_prompts,
                                        init_pool, key_matching_loss, select_topk,
                                        selection_counts)
from pecft_jax.peft.prompts import (PrefixConfig, PromptConfig, init_prefixes, init_prompts,
                                    prefix_context, prompt_context)
from pecft_jax.peft.ssf import SSFConfig, init_ssf, ssf_context

__all__ = [
    "AdapterConfig", "LayerPEFT", "LoraConfig", "PEFTContext", "PrefixConfig", "PromptConfig",
    "SSFConfig", "adapter_context", "batch_mean", "cosine_similarity", "gather_prompts",
    "init_adapters", "init_lora", "init_pool", "init_prefixes", "init_prompts", "init_ssf",
    "key_matching_loss", "lora_context", "merge_lora", "prefix_context", "prompt_context",
    "resolve_targets", "select_topk", "selection_counts", "ssf_context", "unmerge_lora",
]
