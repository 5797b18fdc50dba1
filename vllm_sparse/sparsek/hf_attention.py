# SPDX-License-Identifier: Apache-2.0
"""SparseK attention as a transformers attention function, for training the scorer and
for evaluating it in Hugging Face models (no vLLM).

The rule is `scorer.attention_rule` (window + hard top-k, values scaled by p =
SPARSEK(u, k)): out_i = sum_j softmax_j(q_i . k_j * scaling over the attended set) p_j v_j.
The scorer learns through p (the paper's soft value scaling); the attended set itself is
not differentiable. Select it with `attn_implementation=ATTN_NAME` (after `register()`) and
pass the per-forward state as the model kwarg `sparsek=SparseKStep(params)`: transformers
hands model kwargs down to the attention function. `params` is anything with `.k`,
`.window` and `.layer(i) -> (weight [Hkv, 2D], bias [Hkv], slope [Hkv])`:
`SparseKParams` (an nn.Module owning them as nn.Parameters, for training) or a
`SparseKScorer` (evaluation).
"""

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vllm_sparse.sparsek.scorer import SparseKScorer, attention_rule, scores

ATTN_NAME = "sparsek"


class SparseKParams(nn.Module):
    """Trainable scorer: weight [L, Hkv, 2D], bias [L, Hkv], slope [L, Hkv] (the
    `SparseKScorer` layout) as nn.Parameters; k and window are fixed hyperparameters."""

    def __init__(self, scorer: SparseKScorer):
        super().__init__()
        self.weight = nn.Parameter(scorer.weight.detach().float().clone())
        self.bias = nn.Parameter(scorer.bias.detach().float().clone())
        self.slope = nn.Parameter(scorer.slope.detach().float().clone())
        self.k, self.window = scorer.k, scorer.window

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weight [Hkv, 2D], bias [Hkv], slope [Hkv]) of one layer (differentiable)."""
        return self.weight[index], self.bias[index], self.slope[index]

    def to_scorer(self, meta: dict | None = None) -> SparseKScorer:
        return SparseKScorer(self.weight.detach().cpu().clone(), self.bias.detach().cpu().clone(),
                             self.slope.detach().cpu().clone(), self.k, self.window, dict(meta or {}))


@dataclass
class SparseKStep:
    """State of one model forward, passed as the model kwarg `sparsek=`.

    params: `SparseKParams` or `SparseKScorer`. query_block: queries per block (memory:
    a few [Hq, query_block, N] tensors at a time; blocks are checkpointed under autograd).
    kernels: SPARSEK implementation ("auto": Triton on CUDA, torch elsewhere; "numba": the
    CPU rule kernel, no gradient; see `scorer.attention_rule`).
    detach_features: score detached k / v (the scorer then learns only through p, not
    through earlier layers' keys and values).
    p_sum / free / top[layer]: sums over the batch of p on the top-k entries, of top-k
    entries with 0 < p < 1 (the ones that pass gradient) and of top-k entries, counted over
    queries with more than k candidates (for logging: free / top near 0 means a hard scorer
    that no longer learns).
    """

    params: object
    query_block: int = 256
    kernels: str = "auto"
    detach_features: bool = False
    p_sum: dict = field(default_factory=dict)
    free: dict = field(default_factory=dict)
    top: dict = field(default_factory=dict)


def _rule_block(u, start: int, n_q: int, top_k: int, window: int, kernels: str,
                with_stats: bool = True):
    """Scores u [Hkv, K] of the first K tokens, queries at positions start..start+n_q-1 ->
    (columns [Hkv, L] int64 or None, attended [Hkv, Q, L] bool, value weights [Hkv, Q, L]
    (differentiable in u, except with kernels="numba"), stats [3] or None: p sum, free count,
    top count over rows with > k candidates). columns: the key positions the masks cover
    (kernels="numba": only those the block attends, about k + W + Q); None: all K."""
    pos = torch.arange(start, start + n_q, device=u.device)
    if kernels == "numba":
        from vllm_sparse.kernels.cpu_sparsek_rule import cpu_sparsek_rule

        columns, attended, weights = cpu_sparsek_rule(u, top_k, window, pos, compact=True)
        key_pos = columns[:, None, :]
    else:
        columns = None
        attended, weights = attention_rule(u, top_k, window, pos, kernels)
        key_pos = torch.arange(u.shape[1], device=u.device)
    if not with_stats:
        return columns, attended, weights, None
    with torch.no_grad():
        many = (pos >= window + top_k)[None, :, None]                                # > k candidates
        top = many & attended & (key_pos <= pos[:, None] - window)
        p = torch.where(top, weights, 0)
        stats = torch.stack([p.sum(), (top & (p > 0) & (p < 1)).sum(), top.sum()]).double()
    return columns, attended, weights, stats


def _attend_block(q, k, v, attended, weights, scaling: float):
    """q [Hkv, g, Q, D], k, v [Hkv, K, D], attended / weights [Hkv, Q, K] -> out [Hkv, g, Q, D]."""
    s = torch.einsum("hgqd,hkd->hgqk", q, k) * scaling
    a = s.masked_fill(~attended[:, None], float("-inf")).softmax(dim=-1)
    return torch.einsum("hgqk,hkd->hgqd", a * weights[:, None].to(a.dtype), v)


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, u: torch.Tensor,
           top_k: int, window: int, scaling: float, query_block: int = 256,
           kernels: str = "auto", with_stats: bool = True
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One sequence: query [Hq, Nq, D] (the last Nq positions), key / value [Hkv, N, D],
    u [Hkv, N] -> (out [Hq, Nq, D] in query's dtype, stats [3] (see `SparseKStep`), or None
    without `with_stats`). Computed in float32 at least. Under autograd the attention of each
    query block is checkpointed (its [Hq, block, N] probabilities are recomputed in backward);
    the rule (top-k and SPARSEK, [Hkv, block, N]) is kept, so SPARSEK runs once per forward.
    kernels="numba" (CPU inference, no gradient) attends each block over only the keys it
    uses, gathered (`cpu_sparsek_rule`'s compact form): the same result, O(budget) work
    per query instead of O(N)."""
    if kernels == "numba" and torch.is_grad_enabled() and u.requires_grad:
        raise ValueError("SparseK: kernels='numba' has no backward; use 'auto' or 'torch' "
                         "to train the scorer")
    heads_q, n_q, dim = query.shape
    heads, n = key.shape[:2]
    dtype = torch.promote_types(query.dtype, torch.float32)
    qg = query.to(dtype).view(heads, heads_q // heads, n_q, dim)
    k, v = key.to(dtype), value.to(dtype)
    outs, stats = [], torch.zeros(3, dtype=torch.float64, device=query.device)
    for first in range(0, n_q, query_block):
        last = min(n_q, first + query_block)
        end = n - n_q + last                                                         # causal end
        columns, attended, weights, block_stats = _rule_block(
            u[:, :end], n - n_q + first, last - first, top_k, window, kernels, with_stats)
        keys, values = k[:, :end], v[:, :end]
        if columns is not None:
            index = columns[..., None].expand(-1, -1, dim)
            keys, values = keys.gather(1, index), values.gather(1, index)
        args = (qg[:, :, first:last], keys, values, attended, weights, scaling)
        if torch.is_grad_enabled():
            outs.append(checkpoint(_attend_block, *args, use_reentrant=False))
        else:
            outs.append(_attend_block(*args))
        if with_stats:
            stats += block_stats
    out = torch.cat(outs, dim=2).reshape(heads_q, n_q, dim).to(query.dtype)
    return out, (stats if with_stats else None)


def sparsek_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask, dropout: float = 0.0,
                              scaling: float | None = None, sparsek: SparseKStep | None = None,
                              **kwargs):
    """transformers attention function. query [B, Hq, Nq, D], key / value [B, Hkv, N, D]
    (post-RoPE, before repeat_kv; Nq <= N, the queries are the last Nq positions, so a
    KV-cache decode works) -> (out [B, Nq, Hq, D], None). Whole unpadded sequences starting
    at position 0; `attention_mask` and `dropout` are ignored."""
    if sparsek is None:
        raise RuntimeError(f"attn_implementation={ATTN_NAME!r} needs the model kwarg "
                           "sparsek=SparseKStep(params)")
    if query.shape[2] > key.shape[2]:
        raise ValueError(f"{ATTN_NAME}: {query.shape[2]} queries but only {key.shape[2]} keys")
    layer, params = module.layer_idx, sparsek.params
    weight, bias, slope = params.layer(layer)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    positions = torch.arange(key.shape[2], device=key.device)
    outs, stats = [], 0
    for b in range(query.shape[0]):
        k, v = (key[b].detach(), value[b].detach()) if sparsek.detach_features else (key[b], value[b])
        u = scores(k, v, weight, bias, slope, positions)
        out, block_stats = attend(query[b], key[b], value[b], u, params.k, params.window, scaling,
                                  sparsek.query_block, sparsek.kernels)
        outs.append(out)
        stats = stats + block_stats
    # setdefault: a gradient-checkpointing recompute of the layer must not count twice
    for name, value_ in zip(("p_sum", "free", "top"), stats.tolist()):
        getattr(sparsek, name).setdefault(layer, value_)
    return torch.stack(outs).transpose(1, 2).contiguous(), None


def register(name: str = ATTN_NAME) -> str:
    """Register `sparsek_attention_forward` with transformers (idempotent); -> the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, sparsek_attention_forward)
    return name
