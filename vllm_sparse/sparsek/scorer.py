# SPDX-License-Identifier: Apache-2.0
"""SparseK scorers and the attention rule: the contract between training
(`vllm_sparse.sparsek.hf_attention`, driven by `vllm_sparse.train`) and inference (the
`sparsek` backend). Pure torch; every function here is the reference.

Based on https://arxiv.org/abs/2406.16747 (Lou et al. 2024, SparseK + sliding window).
Per (layer, KV head h) a linear scorer gives every token j one query-independent score

    u_j = w_h . concat(k_j, v_j) + b_h + slope_h * j          (k_j post-RoPE, j = position)

from that KV head's own key and value, as the attention op sees them (the paper scores the
layer input; vLLM's attention op only sees q, k, v). For the query at position i:
  * window: tokens i - window < j <= i are attended with value weight 1;
  * candidates: j <= i - window (c_i = max(0, i - window + 1) of them). If c_i <= k all are
    attended with weight 1; otherwise the top-k candidates by u are attended, their values
    scaled by p = SPARSEK(u over ALL c_i candidates, k) = clip(u - tau, 0, 1), sum(p) = k
    (`kernels.sparsek_topk.sparsek`; p > 0 on the whole top-k, p outside it is dropped).
Ties: candidates are ranked by (u descending, position ascending), i.e. the older token
wins; top-k, `evictable` and decode use this one total order.
b_h shifts every score of head h alike, and top-k and SPARSEK are shift-invariant per row:
b has no effect on attention (its gradient is zero); it is kept for the format's sake.

Eviction: u_j never changes, and the candidate set of later queries only grows (by younger
tokens), so the k-th best candidate only improves. A candidate outside the top-k of the
query at position m is never attended by any query at a position >= m.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vllm_sparse.eviction.weights import PerKVHeadWeights

FORMAT = "vllm_sparse.sparsek.scorer/1"


@dataclass
class SparseKScorer(PerKVHeadWeights):
    """Scorer weights of one model.

    weight: [L, Hkv, 2D] float32 (features are concat(k, v) of one KV head, D = head size);
    bias: [L, Hkv]; slope: [L, Hkv] (per-token position term); k: top-k budget per KV
    head (>= 1); window: always-attended recent tokens (>= 0, the query's own token
    included); meta: free-form (training command, data, ...), saved as JSON.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    slope: torch.Tensor
    k: int
    window: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.weight.dim() != 3 or self.weight.shape[2] % 2:
            raise ValueError(f"SparseK scorer: weight must be [layers, kv_heads, 2*head_size], "
                             f"got {tuple(self.weight.shape)}")
        for name in ("bias", "slope"):
            shape = tuple(getattr(self, name).shape)
            if shape != tuple(self.weight.shape[:2]):
                raise ValueError(f"SparseK scorer: {name} {shape} does not match weight "
                                 f"{tuple(self.weight.shape)}; expected {tuple(self.weight.shape[:2])}")
        if isinstance(self.k, bool) or int(self.k) != self.k or self.k < 1:
            raise ValueError(f"SparseK scorer: k={self.k!r}; allowed: integers >= 1")
        if isinstance(self.window, bool) or int(self.window) != self.window or self.window < 0:
            raise ValueError(f"SparseK scorer: window={self.window!r}; allowed: integers >= 0")
        self.k, self.window = int(self.k), int(self.window)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weight [Hkv, 2D], bias [Hkv], slope [Hkv]) of one layer."""
        return self.weight[index], self.bias[index], self.slope[index]

    def save(self, path: str | Path) -> None:
        header = {"format": FORMAT, "k": str(self.k), "window": str(self.window),
                  "meta": json.dumps(self.meta)}
        save_file({name: getattr(self, name).detach().float().contiguous()
                   for name in ("weight", "bias", "slope")}, str(path), metadata=header)

    @classmethod
    def load(cls, path: str | Path) -> "SparseKScorer":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
        if header.get("format") != FORMAT:
            raise ValueError(f"SparseK scorer: {path} has format {header.get('format')!r}; "
                             f"expected {FORMAT!r}")
        t = load_file(str(path))
        return cls(t["weight"], t["bias"], t["slope"], int(header["k"]), int(header["window"]),
                   json.loads(header.get("meta", "{}")))

    @classmethod
    def zeros(cls, num_layers: int, num_kv_heads: int, head_size: int, k: int, window: int,
              slope: float = 0.0) -> "SparseKScorer":
        """Position-only scorer u_j = slope * j. slope <= -1 is StreamingLLM exactly (the
        oldest k tokens with p = 1, plus the window); slope = 0 keeps the oldest k (ties) with
        p = k / c_i; slope >= 1 keeps the k candidates nearest the window."""
        return cls(torch.zeros(num_layers, num_kv_heads, 2 * head_size),
                   torch.zeros(num_layers, num_kv_heads),
                   torch.full((num_layers, num_kv_heads), float(slope)), k, window,
                   {"constant": f"slope={slope}"})


def scores(key: torch.Tensor, value: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
           slope: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """key, value [Hkv, n, D] (key post-RoPE), weight [Hkv, 2D], bias [Hkv], slope [Hkv],
    positions [n] -> u [Hkv, n] (float32 at least; float64 if any input is)."""
    heads, n, d = key.shape
    if value.shape != key.shape or weight.shape != (heads, 2 * d) or bias.shape != (heads,) \
            or slope.shape != (heads,) or positions.shape != (n,):
        raise ValueError(f"SparseK scores: key {tuple(key.shape)}, value {tuple(value.shape)}, "
                         f"weight {tuple(weight.shape)}, bias {tuple(bias.shape)}, slope "
                         f"{tuple(slope.shape)}, positions {tuple(positions.shape)}; expected "
                         f"[H, n, D] x2, [H, 2D], [H], [H], [n]")
    dtype = torch.promote_types(torch.promote_types(key.dtype, weight.dtype), torch.float32)
    w = weight.to(dtype)
    u = key.to(dtype) @ w[:, :d, None] + value.to(dtype) @ w[:, d:, None]            # [H, n, 1]
    return u[..., 0] + bias.to(dtype)[:, None] + slope.to(dtype)[:, None] * positions.to(dtype)


def candidate_counts(query_pos: torch.Tensor, window: int) -> torch.Tensor:
    """query_pos [Q] -> c [Q] int64: candidates j <= pos - window, i.e. max(0, pos - window + 1)."""
    return (query_pos.long() - window + 1).clamp(min=0)


def order_ranks(u: torch.Tensor) -> torch.Tensor:
    """u [Hkv, n] -> rank [Hkv, n] int64 in the total order (u descending, position
    ascending): 0 = best. Top-k of any prefix = its k smallest ranks."""
    order = torch.sort(-u.detach(), dim=-1, stable=True).indices
    ranks = torch.empty_like(order)
    return ranks.scatter_(-1, order, torch.arange(u.shape[-1], device=u.device).expand_as(order))


def _masks(u: torch.Tensor, k: int, window: int, query_pos: torch.Tensor):
    """-> (window [Q, n], top [Hkv, Q, n], counts [Q]) bool, bool, int64."""
    n = u.shape[-1]
    if k < 1 or window < 0:
        raise ValueError(f"SparseK: k={k}, window={window}; allowed: k >= 1, window >= 0")
    pos = query_pos.long()[:, None]
    tokens = torch.arange(n, device=u.device)[None, :]
    win = (tokens <= pos) & (tokens > pos - window)
    counts = candidate_counts(query_pos, window)
    cand = tokens < counts[:, None]                                                  # [Q, n]
    ranks = torch.where(cand[None], order_ranks(u)[:, None, :], n)                   # [H, Q, n]
    kth = ranks.kthvalue(min(k, n), dim=-1, keepdim=True).values if n else ranks
    return win, cand[None] & (ranks <= kth), counts


def attention_rule(u: torch.Tensor, k: int, window: int, query_pos: torch.Tensor,
                   kernels: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """u [Hkv, n] scores of the tokens at positions 0..n-1, query_pos [Q] (< n) ->
    (attended [Hkv, Q, n] bool, value weights [Hkv, Q, n] in u's dtype: 1 on the window, p
    on the top-k candidates, 0 elsewhere; differentiable in u through p).
    kernels: SPARSEK's implementation ("auto", "triton", "torch": `sparsek`'s), or "numba":
    the whole rule in one sweep on the CPU (`kernels/cpu_sparsek_rule.py`; inference only,
    no gradient; the same result)."""
    if kernels == "numba":
        if torch.is_grad_enabled() and u.requires_grad:
            raise ValueError("SparseK: kernels='numba' has no backward; use 'auto' or 'torch' "
                             "to train the scorer")
        from vllm_sparse.kernels.cpu_sparsek_rule import cpu_sparsek_rule
        return cpu_sparsek_rule(u, k, window, query_pos)
    from vllm_sparse.kernels.sparsek_topk import sparsek  # Triton: imported on first use

    win, top, counts = _masks(u, k, window, query_pos)
    z = u[:, None, :].expand(top.shape)
    p = sparsek(z, k, counts.expand(top.shape[:2]), kernels=kernels)
    weights = torch.where(win[None], torch.ones_like(p), torch.where(top, p, torch.zeros_like(p)))
    return win[None] | top, weights


def selected(u: torch.Tensor, k: int, window: int, query_pos: torch.Tensor) -> torch.Tensor:
    """u [Hkv, n], query_pos [Q] -> [Hkv, Q, n] bool: the attended set (window and top-k)."""
    win, top, _ = _masks(u, k, window, query_pos)
    return win[None] | top


def value_weights(u: torch.Tensor, k: int, window: int, query_pos: torch.Tensor,
                  kernels: str = "auto") -> torch.Tensor:
    """u [Hkv, n], query_pos [Q] -> [Hkv, Q, n]: 1 on the window, p on the top-k, else 0."""
    return attention_rule(u, k, window, query_pos, kernels)[1]


def evictable(u: torch.Tensor, k: int, window: int, next_pos: int) -> torch.Tensor:
    """u [Hkv, n] (covering every candidate of next_pos: n > next_pos - window) -> [Hkv, n]
    bool: candidates of the query at next_pos outside its top-k. No query at a position
    >= next_pos attends them."""
    if u.shape[-1] <= next_pos - window:
        raise ValueError(f"SparseK evictable: scores of {u.shape[-1]} tokens; next_pos={next_pos} "
                         f"with window={window} needs at least {next_pos - window + 1}")
    win, top, counts = _masks(u, k, window, torch.tensor([next_pos], device=u.device))
    cand = torch.arange(u.shape[-1], device=u.device) < counts
    return cand[None] & ~top[:, 0]
