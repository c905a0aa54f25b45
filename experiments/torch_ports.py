"""Eager PyTorch ports of the methods' training steps, for ``benchmark_step.py``.

Each port re-implements one method's first-task training step -- same shapes, same trainable
parts, same loss terms -- the way the method's official PyTorch code computes it, over one
timm-layout ViT (pre-norm blocks, fused qkv, GELU MLP), or for a text method a Hugging
Face-layout BERT encoder. Where the official step grows with the task, the port lays out
task ``Step.task``'s (``benchmark_step.GROWS_WITH_TASK``). ``PORTS[name](step)`` returns
a :class:`Port`: the trainable tensors and a function of no arguments that computes the
loss; the benchmark runs Adam on them. The statistics methods (SimpleCIL, RanPAC) have no
gradient step: their port, :func:`statistics_step`, is one batch of their statistics pass.

Where the JAX step does more than the official code's first task -- it carries every task's
slice of a stacked parameter so that one program serves every task -- the port does what the
official code does (the benchmark's docstring lists these). PyTorch is imported here, so this
module is only imported by the benchmark's PyTorch worker.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as tnn
import torch.nn.functional as F


@dataclasses.dataclass
class Port:
    """A ported step: the trainable tensors, the loss of the timed batch, and what runs
    between the backward pass and the optimizer's step (gradient clipping), if anything."""
    params: List[torch.Tensor]
    loss: Callable[[], torch.Tensor]
    before_update: Optional[Callable[[], object]] = None


# ============================================================================ backbone
class Block(tnn.Module):
    """A pre-norm ViT block with the hooks the ports need, all optional:

    * ``prefix`` ``(B, 2, Lp, D)``: prefix keys and values joined before the block's own;
    * ``lora`` ``{'query'|'key'|'value': fn}``: ``fn(LN1 output)`` ``(B, N, D)`` added to
      that projection, however the method forms it;
    * ``qkv_weight`` ``(3D, D)``: in place of the fused qkv weight (a LoRA merged into it);
    * ``attn_adapter`` ``fn(LN1 output)``: added to the attention's output;
    * ``mlp_adapter`` ``fn(x)``: added to the MLP's output, reading the residual stream
      (AdaptFormer's parallel adapter).
    """

    def __init__(self, d: int, heads: int, mlp_dim: int):
        super().__init__()
        self.d, self.heads = d, heads
        self.norm1, self.norm2 = tnn.LayerNorm(d, eps=1e-6), tnn.LayerNorm(d, eps=1e-6)
        self.qkv, self.proj = tnn.Linear(d, 3 * d), tnn.Linear(d, d)
        self.fc1, self.fc2 = tnn.Linear(d, mlp_dim), tnn.Linear(mlp_dim, d)

    def split_heads(self, t):
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.d // self.heads).transpose(1, 2)

    def forward(self, x, prefix=None, lora=None, attn_adapter=None, mlp_adapter=None,
                qkv_weight=None):
        b, n, d = x.shape
        normed = self.norm1(x)
        qkv = (self.qkv(normed) if qkv_weight is None
               else F.linear(normed, qkv_weight, self.qkv.bias))
        q, k, v = qkv.split(d, dim=-1)
        if lora:
            q, k, v = (t + lora[name](normed) if name in lora else t
                       for name, t in zip(("query", "key", "value"), (q, k, v)))
        q, k, v = map(self.split_heads, (q, k, v))
        if prefix is not None:
            pk, pv = (self.split_heads(prefix[:, i]) for i in (0, 1))
            k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        att = F.scaled_dot_product_attention(q, k, v)
        h = self.proj(att.transpose(1, 2).reshape(b, n, d))
        if attn_adapter is not None:
            h = h + attn_adapter(normed)
        x = x + h
        h = self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))
        if mlp_adapter is not None:
            h = h + mlp_adapter(x)
        return x + h


class ViT(tnn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.patch = tnn.Conv2d(cfg.num_channels, d, cfg.patch_size, cfg.patch_size)
        self.cls = tnn.Parameter(torch.zeros(1, 1, d))
        self.pos = tnn.Parameter(torch.randn(1, cfg.num_patches + 1, d) * 0.02)
        self.blocks = tnn.ModuleList(Block(d, cfg.num_heads, cfg.mlp_dim)
                                     for _ in range(cfg.num_layers))
        self.norm = tnn.LayerNorm(d, eps=1e-6)

    def forward(self, images, prompts=None, hooks: Optional[Dict[int, dict]] = None):
        """The final-LayerNorm tokens; ``prompts`` ``(B, L, D)`` join after [CLS];
        ``hooks[i]`` are block ``i``'s keyword arguments."""
        x = self.patch(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        if prompts is not None:
            x = torch.cat([x[:, :1], prompts, x[:, 1:]], 1)
        for i, blk in enumerate(self.blocks):
            x = blk(x, **(hooks or {}).get(i, {}))
        return self.norm(x)


class AdaptFormer(tnn.Module):
    """``scale * up(dropout(relu(down(x))))``, ``up`` zero at the start (the official
    AdaptFormer / APER / EASE / SSIAT 'lora' initialisation)."""

    def __init__(self, d: int, bottleneck: int, scale: float, dropout: float):
        super().__init__()
        self.down, self.up = tnn.Linear(d, bottleneck), tnn.Linear(bottleneck, d)
        tnn.init.zeros_(self.up.weight), tnn.init.zeros_(self.up.bias)
        self.scale, self.dropout = scale, dropout

    def forward(self, x):
        return self.scale * self.up(F.dropout(F.relu(self.down(x)), self.dropout,
                                              training=True))


class BertLayer(tnn.Module):
    """A post-LN BERT block (exact GELU), dropout on while training, as Hugging Face's."""

    def __init__(self, cfg):
        super().__init__()
        d, self.heads = cfg.hidden_size, cfg.num_heads
        self.qkv, self.out = tnn.Linear(d, 3 * d), tnn.Linear(d, d)
        self.fc1, self.fc2 = tnn.Linear(d, cfg.intermediate_size), tnn.Linear(
            cfg.intermediate_size, d)
        eps = cfg.layer_norm_eps
        self.norm1, self.norm2 = tnn.LayerNorm(d, eps=eps), tnn.LayerNorm(d, eps=eps)
        self.p, self.p_attn = cfg.hidden_dropout, cfg.attention_dropout

    def forward(self, x, bias):
        b, n, d = x.shape
        q, k, v = (t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for t in self.qkv(x).split(d, dim=-1))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.p_attn)
        x = self.norm1(x + F.dropout(self.out(att.transpose(1, 2).reshape(b, n, d)), self.p))
        return self.norm2(x + F.dropout(self.fc2(F.gelu(self.fc1(x))), self.p))


class Bert(tnn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.word = tnn.Embedding(cfg.vocab_size, d)
        self.position = tnn.Embedding(cfg.max_position_embeddings, d)
        self.token_type = tnn.Embedding(cfg.type_vocab_size, d)
        self.norm = tnn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.layers = tnn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))
        self.p = cfg.hidden_dropout

    def embed(self, vectors, positions):
        """The embedding layer on word-space vectors ``(B, N, D)`` at ``positions``."""
        return F.dropout(self.norm(vectors + self.position(positions)
                                   + self.token_type.weight[0]), self.p)

    def encode(self, x, attention_mask):
        """The encoder on embedded tokens; ``attention_mask`` ``(B, N)``, 0 on padding."""
        bias = torch.zeros(attention_mask.shape, dtype=x.dtype).masked_fill(
            attention_mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        return x


# ========================================================================= the step
@dataclasses.dataclass
class Step:
    """What a port builds on: the method (its resolved ``config``), the backbone's config,
    the frozen model, the timed batch, the class mask of the timed task's classes and that
    task's index."""
    method: object
    cfg: object
    model: tnn.Module  # ViT, or Bert for a text method
    inputs: object     # images (B, C, H, W); a text method's {'token_ids', 'attention_mask'}
    labels: torch.Tensor
    mask: torch.Tensor
    num_classes: int
    task: int = 0  # the timed task (benchmark_step.GROWS_WITH_TASK's ports lay out its step)

    @property
    def c(self):
        return self.method.config

    @property
    def d(self) -> int:
        return self.cfg.hidden_size

    def query(self):
        """The frozen model's [CLS], no gradient (the prompt methods' query)."""
        with torch.no_grad():
            return self.model(self.inputs)[:, 0]

    def ce(self, logits):
        """Cross-entropy over the timed task's classes."""
        return F.cross_entropy(logits + self.mask, self.labels)


def uniform(*shape) -> tnn.Parameter:
    return tnn.Parameter(torch.empty(*shape).uniform_(-1, 1))


def cosine(a, b):
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


PORTS: Dict[str, Callable[[Step], Port]] = {}


def port(*names):
    def register(fn):
        for name in names:
            PORTS[name] = fn
        return fn
    return register


# ======================================================================= prompt family
@port("l2p")
def l2p(s: Step) -> Port:
    c, d, head = s.c, s.d, tnn.Linear(s.d, s.num_classes)
    pool, keys = uniform(c.pool_size, c.prompt_length, d), uniform(c.pool_size, d)

    def loss():
        sim = cosine(s.query(), keys)
        idx = sim.topk(c.top_k, dim=1).indices
        tokens = s.model(s.inputs, prompts=pool[idx].reshape(len(s.inputs), -1, d))
        n = c.top_k * c.prompt_length
        feature = tokens[:, 1:1 + n].mean(1) if c.head_input == "prompt" else tokens[:, 0]
        pull = (1 - sim.gather(1, idx)).sum(1).mean()
        return s.ce(head(feature)) + c.pull_constraint * pull
    return Port([pool, keys, *head.parameters()], loss)


@port("dualprompt")
def dualprompt(s: Step) -> Port:
    c, m, d, head = s.c, s.method, s.d, tnn.Linear(s.d, s.num_classes)
    g = {i: uniform(2, c.g_prompt_length, d) for i in m.g_layers}
    e = {i: uniform(m.pool_size, 2, c.e_prompt_length, d) for i in m.e_layers}
    keys = uniform(m.pool_size, d)

    def loss():
        q, b = s.query(), len(s.inputs)
        hooks = {i: {"prefix": p.expand(b, -1, -1, -1)} for i, p in g.items()}
        hooks.update({i: {"prefix": p[0].expand(b, -1, -1, -1)} for i, p in e.items()})
        feature = s.model(s.inputs, hooks=hooks)[:, 0]  # task 0's e-prompt
        pull = (1 - cosine(q, keys)[:, 0]).mean()
        return s.ce(head(feature)) + c.pull_constraint * pull
    return Port([*g.values(), *e.values(), keys, *head.parameters()], loss)


@port("coda_prompt")
def coda_prompt(s: Step) -> Port:
    """The official code weighs the components of tasks 0..t: on task 0, its own."""
    c, per, d, head = s.c, s.method.per_task, s.d, tnn.Linear(s.d, s.num_classes)
    comps = {i: [uniform(per, c.prompt_length, d), uniform(per, d), uniform(per, d)]
             for i in s.method.layers}

    def loss():
        q, b = s.query(), len(s.inputs)
        hooks = {}
        for i, (prompts, keys, attention) in comps.items():
            alpha = (F.normalize(q[:, None] * attention[None], dim=-1)
                     * F.normalize(keys, dim=-1)[None]).sum(-1)  # (B, M)
            prompt = torch.einsum("bm,mld->bld", alpha, prompts)
            hooks[i] = {"prefix": prompt.reshape(b, 2, c.prompt_length // 2, d)}
        return s.ce(head(s.model(s.inputs, hooks=hooks)[:, 0]))
    return Port([p for ps in comps.values() for p in ps] + list(head.parameters()), loss)


@port("hide_prompt")
def hide_prompt(s: Step) -> Port:
    from pecft_jax.backbones.context import resolve_layers
    c, head = s.c, tnn.Linear(s.d, s.num_classes)
    layers = resolve_layers(c.prompt_layers, s.cfg.num_layers, "prompt_layers")
    prompts = {i: uniform(2, c.prompt_length, s.d) for i in layers}  # task 0's prefixes

    def loss():
        b = len(s.inputs)
        feature = s.model(s.inputs, hooks={i: {"prefix": p.expand(b, -1, -1, -1)}
                                           for i, p in prompts.items()})[:, 0]
        # the contrastive term over [stored prototypes (none yet on task 0); features]
        sim = feature @ feature.T / c.contrastive_temperature
        contrastive = (torch.logsumexp(sim, 1) - sim.diagonal()).mean()
        return s.ce(head(feature)) + c.contrastive_weight * contrastive
    return Port([*prompts.values(), *head.parameters()], loss)


@port("s_prompts")
def s_prompts(s: Step) -> Port:
    c, head = s.c, tnn.Linear(s.d, s.num_classes)
    prompt = uniform(c.prompt_length, s.d)
    params = [prompt, *head.parameters()]

    def loss():
        feature = s.model(s.inputs, prompts=prompt.expand(len(s.inputs), -1, -1))[:, 0]
        decay = 0.5 * c.first_weight_decay * sum(p.square().sum() for p in params)
        return s.ce(head(feature)) + decay
    return Port(params, loss)


# ============================================================ fine-tuning and adapters
@port("finetune", "slca")
def full_finetuning(s: Step) -> Port:
    """Every backbone weight learns (SLCA's slow learner only scales the rates)."""
    if s.method.name == "finetune" and s.c.mode != "full":
        raise SystemExit("the PyTorch port covers finetune mode 'full' only")
    head = tnn.Linear(s.d, s.num_classes)
    s.model.requires_grad_(True)
    return Port([*s.model.parameters(), *head.parameters()],
                lambda: s.ce(head(s.model(s.inputs)[:, 0])))


def adapters_in_every_block(s: Step, a) -> List[AdaptFormer]:
    """AdaptFormer's adapters (APER's, EASE's, SSIAT's defaults): beside the MLP in every
    block, ReLU; another adapter config would time a step the JAX side does not run."""
    if (a.mode, a.mlp, a.attn, a.layers, a.activation) != ("parallel", True, False, None,
                                                           "relu"):
        raise SystemExit(f"the PyTorch port covers {s.method.name}'s AdaptFormer adapters "
                         f"(parallel, beside the MLP, every block, ReLU) only")
    return [AdaptFormer(s.d, a.bottleneck_dim, a.scale, a.dropout)
            for _ in range(s.cfg.num_layers)]


def adapted_cls(s: Step, adapters: List[AdaptFormer]):
    return s.model(s.inputs, hooks={i: {"mlp_adapter": ad}
                                    for i, ad in enumerate(adapters)})[:, 0]


@port("aper", "ease")
def adapted_cosine_classifier(s: Step) -> Port:
    """APER's first session (RanPAC's, with an adapter, alike) and an EASE task: AdaptFormer
    adapters in every block and the cosine classifier ``sigma * cos(f, w)`` (learnable
    ``sigma``). EASE's training pass runs the current task's adapters only, one pass
    (official ``vit_ease.py`` ``forward_train``); its JAX step gathers them from the stacked
    adapters of every task."""
    if s.method.name == "aper" and s.c.variant != "adapter":
        raise SystemExit("the PyTorch port covers aper variant 'adapter' only")
    d = s.d
    adapters = adapters_in_every_block(s, s.c.adapter)
    kernel = tnn.Parameter(torch.empty(s.num_classes, d).uniform_(-d ** -0.5, d ** -0.5))
    sigma = tnn.Parameter(torch.ones(()))

    def loss():
        return s.ce(sigma * cosine(adapted_cls(s, adapters), kernel))
    return Port([p for ad in adapters for p in ad.parameters()] + [kernel, sigma], loss)


@port("ssiat")
def ssiat(s: Step) -> Port:
    """The shared adapters and the bias-free cosine head under CosFace, ``CE(s (cos - m
    1_y))`` with a fixed ``s`` (official ``vision_transformer_adapter.py``,
    ``classifier.py``, ``utils/loss.py``). The official loss builds the non-target logits
    row by row in a Python loop over the batch; the port computes the same value in one
    expression (which favours PyTorch)."""
    c = s.c
    adapters = adapters_in_every_block(s, c.adapter)
    kernel = tnn.Parameter(torch.randn(s.num_classes, s.d) * c.head_init_std)

    def loss():
        cos = cosine(adapted_cls(s, adapters), kernel)
        margin = c.margin * F.one_hot(s.labels, s.num_classes)
        return s.ce(c.scale * (cos - margin))
    return Port([p for ad in adapters for p in ad.parameters()] + [kernel], loss)


@port("lae")
def lae(s: Step) -> Port:
    """LAE's online module in its blocks (its offline copy starts on task 1): the adapter,
    ``s Linear(r, D)(GELU(Linear(D, r)(LN1 output)))`` beside the attention with a learnable
    scalar ``s`` (official ``pet/adapter.py``); or the LoRA, which the official ``KVLoRA``
    forms as a merged ``[3D, D]`` qkv weight (key and value rows ``s B A``), so autograd
    forms that merged weight's full ``[3D, D]`` gradient in those blocks. The linear head,
    cross-entropy over the task's classes."""
    c, d = s.c, s.d
    head = tnn.Linear(d, s.num_classes)
    if c.module == "adapter":
        downs = {i: tnn.Linear(d, c.adapter_bottleneck) for i in c.layers}
        ups = {i: tnn.Linear(c.adapter_bottleneck, d) for i in c.layers}
        scales = {i: tnn.Parameter(torch.ones(())) for i in c.layers}

        def hooks():
            return {i: {"attn_adapter": lambda x, i=i: scales[i] * ups[i](F.gelu(downs[i](x)))}
                    for i in c.layers}
        params = [p for i in c.layers for m in (downs[i], ups[i]) for p in m.parameters()]
        params += list(scales.values())
    elif c.module == "lora":
        r = c.lora_rank
        factors = {i: {t: (tnn.Parameter(torch.randn(r, d) / d ** 0.5),
                           tnn.Parameter(torch.zeros(d, r)), tnn.Parameter(torch.ones(())))
                       for t in ("key", "value")} for i in c.layers}
        blocks = s.model.blocks

        def hooks():  # W' = W_qkv + [0; s_k B_k A_k; s_v B_v A_v], the input LN1's output
            out = {}
            for i, fs in factors.items():
                delta = torch.cat([torch.zeros(d, d)] + [scale * up @ down
                                                         for down, up, scale in fs.values()])
                weight = blocks[i].qkv.weight + delta
                out[i] = {"qkv_weight": weight}
            return out
        params = [p for fs in factors.values() for f in fs.values() for p in f]
    else:
        raise SystemExit("the PyTorch port covers lae module 'adapter' and 'lora'")

    def loss():
        return s.ce(head(s.model(s.inputs, hooks=hooks())[:, 0]))
    return Port(params + list(head.parameters()), loss)


# ======================================================================== LoRA family
def lora_hooks(factors: Dict[int, dict], branch: Callable) -> Dict[int, dict]:
    """The blocks' ``lora`` hooks: ``branch(*factors)`` at every adapted projection of
    ``factors`` ``{block: {target: factors}}``."""
    return {i: {"lora": {t: branch(*f) for t, f in targets.items()}}
            for i, targets in factors.items()}


@port("inflora")
def inflora(s: Step) -> Port:
    """Task 0's branch at key and value of every block, as the official forward forms it
    (``B_0 A_0``, a D x D weight); A is designed before the task and not trained (its
    values do not change the cost), B starts at zero."""
    c, d, head = s.c, s.d, tnn.Linear(s.d, s.num_classes)
    loras = {i: {target: (torch.randn(c.rank, d) / 3 ** 0.5,
                          tnn.Parameter(torch.zeros(d, c.rank)))
                 for target in ("key", "value")} for i in range(s.cfg.num_layers)}

    def branch(down, up):
        return lambda x: F.linear(x, up @ down)

    hooks = lora_hooks(loras, branch)  # the optimizer updates the factors in place

    def loss():
        return s.ce(head(s.model(s.inputs, hooks=hooks)[:, 0]))
    ups = [up for targets in loras.values() for _, up in targets.values()]
    return Port(ups + list(head.parameters()), loss)


def low_rank(d_in: int, rank: int, d_out: int) -> Tuple[tnn.Parameter, tnn.Parameter]:
    """``A`` ``(r, d_in)`` (HF peft's kaiming-uniform scale) and ``B`` ``(d_out, r)`` zero."""
    bound = d_in ** -0.5
    return (tnn.Parameter(torch.empty(rank, d_in).uniform_(-bound, bound)),
            tnn.Parameter(torch.zeros(d_out, rank)))


def frozen_low_rank(d_in: int, rank: int, d_out: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """An earlier task's learnt ``A`` ``(r, d_in)`` and ``B`` ``(d_out, r)``, frozen: random
    values (they do not change the cost), ``B`` non-zero as a trained one is."""
    return torch.randn(rank, d_in) / d_in ** 0.5, torch.randn(d_out, rank) / rank ** 0.5


@port("sd_lora")
def sd_lora(s: Step) -> Port:
    """Task ``t``'s step (``s.task``) as the official training forward runs it
    (``backbone/lora.py``, ``_LoRA_qkv_timm_train``): at query and value of every block, each
    earlier task's frozen direction in sequence, ``alpha_i B_i(A_i x) / (||B_i||_F
    ||A_i||_F)``, then the task's own ``alpha_t B_t(A_t x)``; the magnitudes are scalars
    shared by all blocks and both projections, and all of them learn. From task 1 on the
    official step also computes ``compute_ortho_loss`` (``sum ||A_i A_t^T||^2`` over every
    earlier task and adapted projection) and leaves it out of the loss
    (``models/sdlora.py``, ``_update_representation``); the port computes it too, but from
    memory: the official code first reads each earlier task's ``A`` from its file
    (``torch.load``) every step. It also builds four ``nn.Linear`` per block on every call
    and wraps each earlier task's factors in new ``Parameter``s. The port leaves the loads
    and the wrapping out, which favours PyTorch. The JAX step folds the earlier directions
    into the kernels where that costs less (ViT-Demo/7's), else carries every task's
    factors, stacked along the rank: its shapes do not change with the task."""
    c, d, t, head = s.c, s.d, s.task, tnn.Linear(s.d, s.num_classes)
    factors = {i: {target: low_rank(d, c.rank, d) + ([frozen_low_rank(d, c.rank, d)
                                                       for _ in range(t)],)
                   for target in ("query", "value")} for i in range(s.cfg.num_layers)}
    magnitude = tnn.Parameter(torch.tensor(c.magnitude_init))
    earlier_magnitudes = tnn.Parameter(torch.full((t,), c.magnitude_init))

    def branch(a, b, earlier):
        def delta(x):
            out = 0
            for alpha, (a_i, b_i) in zip(earlier_magnitudes, earlier):
                out = out + alpha * (F.linear(F.linear(x, a_i), b_i)
                                     / (torch.norm(b_i) * torch.norm(a_i)))
            return out + magnitude * F.linear(F.linear(x, a), b)
        return delta

    hooks = lora_hooks(factors, branch)  # the optimizer updates the factors in place

    def loss():
        logits = head(s.model(s.inputs, hooks=hooks)[:, 0])
        if t:  # computed every step, not part of the loss (the official ortho_loss)
            sum(torch.square(a_i @ a.T).sum() for fs in factors.values()
                for a, _, earlier in fs.values() for a_i, _ in earlier)
        return s.ce(logits)
    params = [p for fs in factors.values() for f in fs.values() for p in f[:2]]
    return Port(params + [magnitude, *([earlier_magnitudes] if t else []),
                          *head.parameters()], loss)


@port("o_lora")
def o_lora(s: Step) -> Port:
    """Task ``t``'s step (``s.task``) as the official patched peft ``lora.py`` runs it: at
    query and value, the earlier tasks' LoRAs concatenated along the rank (``lora_A/B``,
    frozen; rank ``r t``, none on task 0) and the task's own (``loranew_A/B``), both reading
    one dropout of ``x``, each scaled by ``lora_alpha / r``; the loss plus ``lambda_1 sum
    |A_old A_new^T|`` and ``lambda_2 sum ||W||`` over the new factors, computed every step
    as the official trainer does, the LoRA's gradient clipped to norm ``lora_grad_clip``
    (the official ``max_grad_norm``). A linear head over the classes, ours (the official
    setting is T5 generation). The JAX step carries every task's factors, stacked along the
    rank, whatever the task. The official trainer also logs three ``.item()`` values a
    step (device syncs); the port leaves them out (which favours PyTorch)."""
    c, d, t, head = s.c, s.d, s.task, tnn.Linear(s.d, s.num_classes)
    targets = tuple(c.target_modules)
    if not set(targets) <= {"query", "value", "key"}:
        raise SystemExit("the PyTorch port covers o_lora at query, key and value only")
    factors = {i: {target: low_rank(d, c.rank, d) + frozen_low_rank(d, c.rank * t, d)
                   for target in targets} for i in range(s.cfg.num_layers)}
    scaling = c.lora_alpha / c.rank
    lora_params = [p for fs in factors.values() for f in fs.values() for p in f[:2]]

    def branch(a, b, old_a, old_b):
        def delta(x):
            x = F.dropout(x, c.lora_dropout, True)
            new = F.linear(F.linear(x, a), b)
            if t:  # (on task 0 the official code adds the rank-0 LoRA's zeros; not here)
                new = new + F.linear(F.linear(x, old_a), old_b)
            return scaling * new
        return delta

    hooks = lora_hooks(factors, branch)  # the optimizer updates the factors in place

    def loss():
        ce = s.ce(head(s.model(s.inputs, hooks=hooks)[:, 0]))
        orth = sum((old_a @ a.T).abs().sum() for fs in factors.values()
                   for a, _, old_a, _ in fs.values())
        l2 = sum(torch.linalg.norm(p) for p in lora_params)
        return ce + c.lambda_1 * orth + c.lambda_2 * l2
    clip = (lambda: torch.nn.utils.clip_grad_norm_(lora_params, c.lora_grad_clip)
            ) if c.lora_grad_clip else None
    return Port(lora_params + list(head.parameters()), loss, clip)


# ================================================================================ text
@port("progressive_prompts")
def progressive_prompts(s: Step) -> Port:
    """Task ``t`` (``s.task``) as the official BERT code lays it out (``BERT_codebase/
    model_utils.py``, ``dataset_utils.py``, ``continual_learning_utils.py``): the text
    without its [CLS], then the frozen prompts of tasks ``0..t-1`` and the task's own,
    ``[x; P_0; ...; P_t]`` (``L`` word-space vectors each, through the embedding layer at
    positions ``0, n + 1, ...`` counting on across the prompts), ``x + MLP(x)`` on ``P_t``'s
    embedded tokens alone, the encoder with dropout on, the head (dropout, Linear, tanh,
    dropout, Linear) at ``P_t``'s first token. The official code trains the whole
    word-embedding matrix and zeroes every row's gradient but the current prompt's; the
    port trains the prompt alone (which favours PyTorch). The JAX step, like the official
    code, carries the prompts of tasks ``0..t``."""
    c, d, bert, t, length = s.c, s.d, s.model, s.task, s.c.prompt_length
    ids, mask = s.inputs["token_ids"][:, 1:], s.inputs["attention_mask"][:, 1:]
    n = ids.shape[1]
    vocabulary = bert.word.weight

    def random_rows():
        return vocabulary[torch.randint(0, vocabulary.shape[0], (length,))].clone()
    rows = torch.stack([random_rows() for _ in range(t + 1)])  # P_0 .. P_t
    earlier, prompt = rows[:t], tnn.Parameter(rows[t].clone())
    down, up = tnn.Linear(d, c.mlp_bottleneck), tnn.Linear(c.mlp_bottleneck, d)
    hidden, out = tnn.Linear(d, d), tnn.Linear(d, s.num_classes)
    # each prompt's first token at position 0, its others counting on from n + 1
    positions = [torch.arange(1, n + 1)]
    for k in range(t + 1):
        start = n + 1 + k * (length - 1)
        positions += [torch.tensor([0]), torch.arange(start, start + length - 1)]
    positions = torch.cat(positions)
    first = n + t * length  # P_t's first token
    drop = c.head_dropout

    def loss():
        b = len(ids)
        words = torch.cat([bert.word(ids), earlier.reshape(1, t * length, d).expand(b, -1, -1),
                           prompt.expand(b, -1, -1)], 1)
        x = bert.embed(words, positions)
        if c.residual_mlp:
            p = x[:, first:]
            x = torch.cat([x[:, :first], p + up(F.relu(down(p)))], 1)
        prompts_mask = torch.ones(b, (t + 1) * length, dtype=mask.dtype)
        h = bert.encode(x, torch.cat([mask, prompts_mask], 1))[:, first]
        h = torch.tanh(hidden(F.dropout(h, drop)))
        return s.ce(out(F.dropout(h, drop)))
    params = [prompt, *hidden.parameters(), *out.parameters()]
    if c.residual_mlp:
        params += [*down.parameters(), *up.parameters()]
    return Port(params, loss)


# ============================================================== statistics methods
def statistics_step(s: Step, autocast) -> Callable[[], None]:
    """One batch of the statistics pass: SimpleCIL's class sums of the frozen [CLS];
    RanPAC's phase 2, ``h = ReLU(f W)``, ``G += h^T h``, ``Q += h^T y``."""
    name, c = s.method.name, s.c
    width = s.method.width if name == "ranpac" else s.d
    w_rand = torch.randn(s.d, width) if name == "ranpac" and c.M else None
    if name == "simplecil":
        sums = {"a": torch.zeros(s.num_classes, s.d), "b": torch.zeros(s.num_classes)}
    else:
        sums = {"a": torch.zeros(width, width), "b": torch.zeros(width, s.num_classes)}

    def step():
        with torch.no_grad(), autocast:
            f = s.query().float()
            if name == "simplecil":
                sums["a"].index_add_(0, s.labels, f)
                sums["b"].index_add_(0, s.labels, torch.ones(len(s.labels)))
            else:
                h = torch.relu(f @ w_rand) if w_rand is not None else f
                sums["a"] += h.T @ h
                sums["b"] += h.T @ F.one_hot(s.labels, s.num_classes).float()
        sums["a"].sum().item()  # wait for the device
    return step
