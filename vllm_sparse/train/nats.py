# SPDX-License-Identifier: Apache-2.0
"""NAtS gate training: a transformers attention function with a differentiable
token-type mask, and the `GateMethod` that plugs it into `distill.distill`.

Based on https://arxiv.org/abs/2502.13251 (chunk mode), with the gate of
`vllm_sparse.nats.gates`: types per (layer, KV head, complete chunk) from the chunk's own
post-RoPE keys and values (before repeat_kv), the first chunk forced GLOBAL.

Training mask, for query i and key j in complete chunk c (y = straight-through
Gumbel-softmax one-hot over the 3 types, computed from DETACHED k/v so the gate learns only
through the mask):

    m_ij = causal_ij * sum_t y_t(c) * [i <= life_t(c)]

life_t(c) (`gates.type_lifetimes`) is the last query that would see c if it had type t,
given the other chunks' hard types (non-differentiable). Tokens of the incomplete last
chunk have m_ij = causal_ij. Attention = m * exp(s - max) / sum_j(m * exp(s - max)); at a
one-hot y this equals softmax over `gates.visible`, and dL/dy_t(c) sums dL/dm_ij over
the queries that type t would let see c.

Sparsity penalty ("kept fraction"): the fraction of the sequence's KV tokens still live at
its last query, sum_c sum_t y_t(c) * C * [N-1 <= life_t(c)] (+ the incomplete tail) / N,
averaged over layers, KV heads and the batch. Its value at the hard y is exactly
`gates.kept_fraction`, the KV share the eviction backend keeps at that length.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vllm_sparse.nats.gates import GLOBAL, NatsGates, chunk_features, gate_logits, type_lifetimes

ATTN_NAME = "nats_train"


class NatsGateParams(nn.Module):
    """Trainable gates: weight [L, Hkv, 3, 2D], bias [L, Hkv, 3] (the `NatsGates` layout)."""

    def __init__(self, gates: NatsGates):
        super().__init__()
        self.weight = nn.Parameter(gates.weight.detach().float().clone())
        self.bias = nn.Parameter(gates.bias.detach().float().clone())
        self.chunk_size, self.window = gates.chunk_size, gates.window

    @classmethod
    def zeros(cls, num_layers: int, num_kv_heads: int, head_size: int, chunk_size: int,
              window: int) -> "NatsGateParams":
        """Uniform type distribution at start (weight and bias zero)."""
        return cls(NatsGates(torch.zeros(num_layers, num_kv_heads, 3, 2 * head_size),
                             torch.zeros(num_layers, num_kv_heads, 3), chunk_size, window))

    def to_gates(self, meta: dict | None = None) -> NatsGates:
        return NatsGates(self.weight.detach().cpu().clone(), self.bias.detach().cpu().clone(),
                         self.chunk_size, self.window, dict(meta or {}))


@dataclass
class NatsStep:
    """State of one model forward, passed as the model kwarg `nats=`.

    sample: straight-through Gumbel types (training) or argmax (measurement).
    kept[layer]: [B, Hkv] differentiable kept fraction; kept_hard[layer]: the same at the
    argmax types (no noise); type_counts[layer]: [3] chunks per type (sampled types).
    """

    gates: NatsGateParams
    sample: bool = True
    tau: float = 1.0
    query_block: int = 256
    kept: dict = field(default_factory=dict)
    kept_hard: dict = field(default_factory=dict)
    type_counts: dict = field(default_factory=dict)


def sample_types(logits: torch.Tensor, sample: bool, tau: float) -> torch.Tensor:
    """logits [Hkv, n, 3] -> one-hot y [Hkv, n, 3] (straight-through if sample), chunk 0 GLOBAL."""
    if sample:
        y = F.gumbel_softmax(logits, tau=tau, hard=True)
    else:
        y = F.one_hot(logits.argmax(-1), 3).to(logits.dtype)
    first = torch.zeros_like(y[:, :1])
    first[..., GLOBAL] = 1.0
    return torch.cat([first, y[:, 1:]], dim=1)


def chunk_mask(y: torch.Tensor, life: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """y [Hkv, n, 3], life [Hkv, n, 3], query_pos [Q] -> m [Hkv, Q, n]: the soft visibility
    of each complete chunk to each query (causality not applied)."""
    vis = (query_pos[None, :, None, None] <= life[:, None]).to(y.dtype)         # [H, Q, n, 3]
    return torch.einsum("hnt,hqnt->hqn", y, vis)


def token_mask(y: torch.Tensor, life: torch.Tensor, query_pos: torch.Tensor, chunk_size: int,
               seq_len: int, kv_len: int) -> torch.Tensor:
    """-> m [Hkv, Q, kv_len]: `chunk_mask` per token, 1 on the incomplete tail of the
    seq_len-token sequence, times causality."""
    heads, n, _ = y.shape
    m = chunk_mask(y, life, query_pos).repeat_interleave(chunk_size, dim=-1)
    tail = torch.ones(heads, len(query_pos), seq_len - n * chunk_size, dtype=y.dtype,
                      device=y.device)
    m = torch.cat([m, tail], dim=-1)[..., :kv_len]
    causal = torch.arange(kv_len, device=y.device)[None, :] <= query_pos[:, None]
    return m * causal


def training_mask(y: torch.Tensor, chunk_size: int, window: int, seq_len: int) -> torch.Tensor:
    """y [Hkv, n, 3] one-hot (or straight-through) -> m [Hkv, N, N] for all queries."""
    life = type_lifetimes(y.argmax(-1), chunk_size, window)
    pos = torch.arange(seq_len, device=y.device)
    return token_mask(y, life, pos, chunk_size, seq_len, seq_len)


def _block_attention(q, k, v, y, life, start: int, chunk_size: int, seq_len: int,
                     scaling: float):
    """q [Hkv, g, Q, D] (queries start..start+Q-1), k, v [Hkv, K, D] -> [Hkv, g, Q, D]."""
    kv_len = k.shape[1]
    pos = torch.arange(start, start + q.shape[2], device=q.device)
    s = torch.einsum("hgqd,hkd->hgqk", q, k) * scaling
    causal = torch.arange(kv_len, device=q.device)[None, :] <= pos[:, None]
    s = s.masked_fill(~causal, float("-inf"))
    e = torch.exp(s - s.amax(dim=-1, keepdim=True).detach())
    p = e * token_mask(y, life, pos, chunk_size, seq_len, kv_len)[:, None]
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)
    return torch.einsum("hgqk,hkd->hgqd", p, v)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, y: torch.Tensor,
                     life: torch.Tensor, chunk_size: int, scaling: float,
                     query_block: int) -> torch.Tensor:
    """q [Hq, N, D], k, v [Hkv, N, D], y / life [Hkv, n, 3] -> out [Hq, N, D].

    Query-blocked; with autograd on, each block is checkpointed, so only q, k, v and the
    block outputs are kept for backward (not the [Hq, N, N] attention matrix)."""
    heads_q, seq_len, dim = q.shape
    groups = heads_q // k.shape[0]
    qg = q.view(k.shape[0], groups, seq_len, dim)
    outs = []
    for start in range(0, seq_len, query_block):
        end = min(seq_len, start + query_block)
        args = (qg[:, :, start:end], k[:, :end], v[:, :end], y, life, start, chunk_size,
                seq_len, scaling)
        if torch.is_grad_enabled():
            outs.append(checkpoint(_block_attention, *args, use_reentrant=False))
        else:
            outs.append(_block_attention(*args))
    return torch.cat(outs, dim=2).reshape(heads_q, seq_len, dim)


def _visible_sdpa(q, k, v, y, life, chunk_size: int, scaling: float) -> torch.Tensor:
    """No-grad path of `masked_attention`: softmax over the hard mask with sdpa."""
    pos = torch.arange(q.shape[1], device=q.device)
    vis = token_mask(y, life, pos, chunk_size, q.shape[1], q.shape[1]) > 0.5
    vis = vis.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=vis, scale=scaling,
                                          enable_gqa=True)


def _kept(y: torch.Tensor, life: torch.Tensor, chunk_size: int, seq_len: int) -> torch.Tensor:
    """y, life [Hkv, n, 3] -> [Hkv] fraction of the seq_len tokens live at query seq_len - 1."""
    live = (life >= seq_len - 1).to(y.dtype)
    tail = seq_len - y.shape[1] * chunk_size
    return ((y * live).sum(dim=(1, 2)) * chunk_size + tail) / seq_len


def _layer_types(step: NatsStep, layer: int, key: torch.Tensor, value: torch.Tensor):
    """key, value [Hkv, N, D] of one sequence -> (y, life, kept, kept_hard)."""
    c, n = step.gates.chunk_size, key.shape[1] // step.gates.chunk_size
    feats = chunk_features(key[:, : n * c].detach(), value[:, : n * c].detach(), c)
    logits = gate_logits(feats, step.gates.weight[layer], step.gates.bias[layer])
    y = sample_types(logits, step.sample, step.tau)
    life = type_lifetimes(y.detach().argmax(-1), c, step.gates.window)
    hard = sample_types(logits.detach(), False, step.tau)
    hard_life = type_lifetimes(hard.argmax(-1), c, step.gates.window)
    return y, life, _kept(y, life, c, key.shape[1]), _kept(hard, hard_life, c, key.shape[1])


def nats_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, attention_mask, scaling: float,
                           dropout: float = 0.0, nats: NatsStep | None = None, **kwargs):
    """transformers attention function. query [B, Hq, N, D], key / value [B, Hkv, N, D]
    (post-RoPE, before repeat_kv) -> (out [B, N, Hq, D], None). Causal self-attention over
    whole unpadded sequences (no KV cache); `attention_mask` is ignored."""
    if nats is None:
        raise RuntimeError(f"attn_implementation={ATTN_NAME!r} needs the model kwarg "
                           "nats=NatsStep(...) (see NatsMethod.step_kwargs)")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"{ATTN_NAME}: query length {query.shape[2]} != key length "
                         f"{key.shape[2]}; only full-sequence forwards (no KV cache) are supported")
    layer, outs, kept, hard, counts = module.layer_idx, [], [], [], 0
    for b in range(query.shape[0]):
        y, life, kept_b, hard_b = _layer_types(nats, layer, key[b], value[b])
        if torch.is_grad_enabled():
            outs.append(masked_attention(query[b], key[b], value[b], y, life,
                                         nats.gates.chunk_size, scaling, nats.query_block))
        else:  # measurement: same values, through the fused kernel with a boolean mask
            outs.append(_visible_sdpa(query[b], key[b], value[b], y, life,
                                      nats.gates.chunk_size, scaling))
        kept.append(kept_b), hard.append(hard_b)
        counts = counts + y.detach().sum(dim=(0, 1))
    # setdefault: a gradient-checkpointing recompute must not replace the loss-side tensors
    nats.kept.setdefault(layer, torch.stack(kept))
    nats.kept_hard.setdefault(layer, torch.stack(hard))
    nats.type_counts.setdefault(layer, counts)
    return torch.stack(outs).transpose(1, 2).contiguous(), None


class NatsMethod:
    """`distill.GateMethod` for NAtS: trains `NatsGateParams` through `nats_attention_forward`.

    Parameters
    ----------
    params : NatsGateParams
    tau : float, default 1.0
        Gumbel-softmax temperature.
    query_block : int, default 256
        Queries per attention block (memory: ~5 * Hq * query_block * N floats at a time).
    """

    attn_name = ATTN_NAME

    def __init__(self, params: NatsGateParams, tau: float = 1.0, query_block: int = 256):
        from transformers import AttentionInterface

        AttentionInterface.register(ATTN_NAME, nats_attention_forward)
        self.params, self.tau, self.query_block = params, tau, query_block

    def step_kwargs(self, sample: bool = True) -> dict:
        return {"nats": NatsStep(self.params, sample, self.tau, self.query_block)}

    def regularizer(self, kwargs: dict) -> tuple[torch.Tensor, dict]:
        """-> (differentiable kept fraction, metrics: kept (sampled), kept_hard (argmax),
        frac_global / frac_local / frac_sliding of the sampled chunk types)."""
        step: NatsStep = kwargs["nats"]
        kept = torch.stack([step.kept[i].mean() for i in sorted(step.kept)]).mean()
        hard = torch.stack([step.kept_hard[i].mean() for i in sorted(step.kept_hard)]).mean()
        counts = torch.stack(list(step.type_counts.values())).sum(0)
        fracs = (counts / counts.sum().clamp_min(1)).tolist()
        return kept, {"kept": kept.item(), "kept_hard": hard.item(), "frac_global": fracs[0],
                      "frac_local": fracs[1], "frac_sliding": fracs[2]}
