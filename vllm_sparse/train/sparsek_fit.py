# SPDX-License-Identifier: Apache-2.0
"""A SparseK scorer fitted in closed form to the dense model's attention maps.

The distillation of `vllm_sparse.train.sparsek` learns only through SPARSEK's p on the
few top-k entries near the threshold. From a position-only start that signal is too weak
to find which tokens matter (configs/sparsek/README.md). This module distills the dense
teacher's *attention maps* into the scorer directly, by weighted ridge regression; the
result ranks tokens by content and can then be fine-tuned by the KL distillation
(`sparsek --init`).

Per (layer, KV head h) and token j, with A[g, i, j] the teacher's attention of query head
g (in h's group) at position i, the relative attention j receives as a SparseK candidate is

    r_j = mean over {(g, i): j <= i - window} of (i + 1) * A[g, i, j]

(1 = the share of uniform attention over the query's i + 1 tokens; a candidate is a token
that has left the query's window, so recent-token attention inside the window does not
count). The regression fits y_j = log(r_j + eps) by y_j ~ w . concat(k_j, v_j) + c * j + b
on post-RoPE keys, as the scorer sees them, weighting token j by n_j = |{(g, i)}|; tokens
with fewer than `min_queries` such queries per head are left out. The ridge term is
`ridge` times the diagonal of the weighted Gram matrix, so it does not depend on feature
scales. The scorer is `sharpness` * (w, b, c): a score gap of 1 / sharpness in log relative
attention is one unit of SPARSEK's ramp, so a large sharpness gives p = 1 on almost every
top-k entry (a hard top-k).
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vllm_sparse.sparsek.scorer import SparseKScorer

ATTN_NAME = "sparsek_attention_mass"
EPS = 1e-3


def relative_attention(query: torch.Tensor, key: torch.Tensor, scaling: float, window: int,
                       query_block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """One causal sequence: query [Hq, N, D], key [Hkv, N, D] (Hq a multiple of Hkv) ->
    (mass [Hkv, N] float64: sum over the group's heads g and the queries i >= j + window of
    (i + 1) * A[g, i, j]; count [N] float64: the number of such (g, i) pairs per head group).
    The mean relative attention is mass / count where count > 0."""
    heads_q, n, dim = query.shape
    heads = key.shape[0]
    if heads_q % heads or key.shape[1:] != (n, dim) or window < 1:
        raise ValueError(f"relative_attention: query {tuple(query.shape)}, key "
                         f"{tuple(key.shape)}, window={window}; expected [Hq, N, D], [Hkv, N, D] "
                         "with Hq a multiple of Hkv, window >= 1")
    group = heads_q // heads
    q = query.float().view(heads, group, n, dim)
    k = key.float()
    tokens = torch.arange(n, device=key.device)
    mass = torch.zeros(heads, n, dtype=torch.float64, device=key.device)
    for first in range(0, n, query_block):
        pos = tokens[first:first + query_block]
        s = torch.einsum("hgqd,hkd->hgqk", q[:, :, pos], k) * scaling
        a = s.masked_fill(tokens[None, :] > pos[:, None], float("-inf")).softmax(dim=-1)
        candidate = tokens[None, :] <= pos[:, None] - window                         # [Q, N]
        relative = a * ((pos[:, None] + 1).to(a.dtype) * candidate)
        mass += relative.sum(dim=(1, 2)).double()
    count = (n - window - tokens).clamp(min=0).double() * group
    return mass, count


@dataclass
class AttentionMass:
    """Per-forward state, passed as the model kwarg `attention_mass=`: window (the SparseK
    window the candidates are defined by), query_block, and per layer after the forward
    `layers[i] = (key [Hkv, N, D], value [Hkv, N, D], mass [Hkv, N], count [N])` of
    batch row 0 (the fit runs one sequence at a time)."""

    window: int
    query_block: int = 256
    layers: dict = field(default_factory=dict)


def attention_mass_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, attention_mask, dropout: float = 0.0,
                           scaling: float | None = None,
                           attention_mass: AttentionMass | None = None, **kwargs):
    """transformers attention function: dense causal attention (the teacher, unchanged)
    that also records `relative_attention` and the keys / values of its layer.
    query [1, Hq, N, D], key / value [1, Hkv, N, D] -> (out [1, N, Hq, D], None)."""
    if attention_mass is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise ValueError(f"{ATTN_NAME}: needs the model kwarg attention_mass=AttentionMass(...) "
                         f"and one whole sequence; got query {tuple(query.shape)}, key "
                         f"{tuple(key.shape)}")
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    group = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(query, key.repeat_interleave(group, 1),
                                         value.repeat_interleave(group, 1), is_causal=True,
                                         scale=scaling)
    with torch.no_grad():
        mass, count = relative_attention(query[0], key[0], scaling, attention_mass.window,
                                         attention_mass.query_block)
        attention_mass.layers[module.layer_idx] = (key[0].float(), value[0].float(), mass, count)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = ATTN_NAME) -> str:
    """Register `attention_mass_forward` with transformers (idempotent); -> the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(name, attention_mass_forward)
    return name


class RidgeFit:
    """Weighted least squares per (layer, KV head), accumulated over sequences.

    Features per token: concat(k_j, v_j) [2D], position j, 1 (F = 2D + 2). xtx [L, Hkv, F, F]
    and xty [L, Hkv, F] are the weighted Gram matrix and moment; yty, sw, swy [L, Hkv] the
    weighted sums of y^2, 1 and y (all float64), so `r_squared` needs no stored tokens."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_size: int):
        features = 2 * head_size + 2
        self.xtx = torch.zeros(num_layers, num_kv_heads, features, features, dtype=torch.float64)
        self.xty = torch.zeros(num_layers, num_kv_heads, features, dtype=torch.float64)
        self.yty, self.sw, self.swy = (torch.zeros(num_layers, num_kv_heads, dtype=torch.float64)
                                       for _ in range(3))

    @staticmethod
    def features(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """key, value [Hkv, n, D] (positions 0..n-1) -> X [Hkv, n, 2D + 2] float64."""
        heads, n, _ = key.shape
        pos = torch.arange(n, dtype=torch.float64, device=key.device)[None, :, None]
        return torch.cat([key.double(), value.double(), pos.expand(heads, n, 1),
                          torch.ones(heads, n, 1, dtype=torch.float64, device=key.device)], -1)

    @staticmethod
    def targets(mass: torch.Tensor, count: torch.Tensor, min_count: float):
        """-> (kept [N] bool, y [Hkv, kept] = log(mass / count + EPS), weight [kept] = count)."""
        kept = count >= max(min_count, 1)
        return kept, torch.log(mass[:, kept] / count[kept] + EPS), count[kept]

    def add(self, layer: int, key, value, mass, count, min_count: float) -> None:
        """One sequence of one layer: key, value [Hkv, N, D], mass [Hkv, N], count [N]
        (`relative_attention`); tokens with count < min_count are left out."""
        kept, y, weight = self.targets(mass, count, min_count)
        x = self.features(key, value)[:, kept]
        self.xtx[layer] += torch.einsum("hnf,n,hng->hfg", x, weight, x)
        self.xty[layer] += torch.einsum("hnf,n,hn->hf", x, weight, y)
        self.yty[layer] += (y * y * weight).sum(-1)
        self.sw[layer] += weight.sum()
        self.swy[layer] += (y * weight).sum(-1)

    def solve(self, ridge: float) -> torch.Tensor:
        """-> beta [L, Hkv, F] float64 minimising sum n_j (y_j - beta . x_j)^2 + ridge *
        sum_f G_ff beta_f^2 (G = the weighted Gram matrix)."""
        if not ridge >= 0:
            raise ValueError(f"ridge={ridge}; allowed: >= 0")
        gram = self.xtx + torch.diag_embed(ridge * torch.diagonal(self.xtx, dim1=-2, dim2=-1))
        return torch.linalg.solve(gram, self.xty[..., None])[..., 0]

    def r_squared(self, beta: torch.Tensor) -> torch.Tensor:
        """Weighted R^2 [L, Hkv] of beta on the accumulated tokens."""
        sse = self.yty - 2 * (beta * self.xty).sum(-1) \
            + torch.einsum("lhf,lhfg,lhg->lh", beta, self.xtx, beta)
        sst = self.yty - self.swy ** 2 / self.sw
        return 1 - sse / sst


def scorer_from(beta: torch.Tensor, sharpness: float, k: int, window: int,
                meta: dict | None = None) -> SparseKScorer:
    """beta [L, Hkv, 2D + 2] (concat(k, v) weights, position, constant) -> the scorer
    u_j = sharpness * beta . x_j."""
    if not sharpness > 0:
        raise ValueError(f"sharpness={sharpness}; allowed: > 0")
    scaled = (sharpness * beta).float()
    return SparseKScorer(scaled[..., :-2].contiguous(), scaled[..., -1].contiguous(),
                         scaled[..., -2].contiguous(), k, window, dict(meta or {}))


def fit(model: nn.Module, batches, windows: int, window: int, min_queries: int = 32,
        ridge: float = 1e-3, query_block: int = 256, progress: bool = True):
    """Accumulate `windows` sequences batches(0), batches(1), ... ([1, N] token ids) through
    the frozen model and solve. -> (beta [L, Hkv, 2D + 2] float64, fit: RidgeFit)."""
    from tqdm import tqdm

    from vllm_sparse.train.distill import _hidden
    from vllm_sparse.train.nats_cli import _gate_shape

    layers, kv_heads, head = _gate_shape(model)
    group = model.config.num_attention_heads // kv_heads
    ridge_fit = RidgeFit(layers, kv_heads, head)
    name = register()
    for index in tqdm(range(windows), disable=not progress, dynamic_ncols=True):
        state = AttentionMass(window, query_block)
        with torch.no_grad():
            _hidden(model, batches(index), name, {"attention_mass": state})
        for layer, (key, value, mass, count) in state.layers.items():
            ridge_fit.add(layer, key, value, mass, count, min_queries * group)
    return ridge_fit.solve(ridge), ridge_fit
