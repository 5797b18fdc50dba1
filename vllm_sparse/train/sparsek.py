# SPDX-License-Identifier: Apache-2.0
"""SparseK scorer training: the `GateMethod` that plugs `vllm_sparse.sparsek.hf_attention`
into `distill.distill`.

Based on https://arxiv.org/abs/2406.16747 (SparseK + sliding window); the rule, the
scorer format and the attention function are in `vllm_sparse.sparsek` (see its DESIGN.md).
The student is the frozen model with attention "sparsek": for each query the window plus
the hard top-k candidates by u_j = w . concat(k_j, v_j) + b + slope * j, values scaled by
p = SPARSEK(u, k). The scorer learns only through p (the attended set is a hard top-k).

No sparsity penalty: SparseK's budget is the hard k (per KV head and query), fixed by the
hyperparameters, so the loss is the KL alone and `regularizer` returns a zero penalty plus
metrics. The bias has zero gradient by construction (top-k and SPARSEK are invariant to a
per-head shift of all scores; weight decay drives it to 0).
"""

import torch

from vllm_sparse.sparsek.hf_attention import ATTN_NAME, SparseKParams, SparseKStep, register


def step_metrics(step: SparseKStep) -> dict:
    """Per-forward statistics summed over layers: p_top = mean p on the top-k entries,
    free_top = share of top-k entries with 0 < p < 1 (those pass gradient), free_top_min =
    the lowest per-layer share (a layer at 0 has stopped learning). nan when no query had
    more than k candidates (sequence shorter than k + window)."""
    top, free, p_sum = (sum(getattr(step, name).values()) for name in ("top", "free", "p_sum"))
    nan = float("nan")
    per_layer = [step.free[i] / step.top[i] for i in step.top if step.top[i] > 0]
    return {"p_top": p_sum / top if top else nan, "free_top": free / top if top else nan,
            "free_top_min": min(per_layer) if per_layer else nan}


class SparseKMethod:
    """`distill.GateMethod` for SparseK: trains `SparseKParams` through
    `hf_attention.sparsek_attention_forward`.

    Parameters
    ----------
    params : SparseKParams
    query_block : int, default 256
        Queries per attention block (memory: a few [Hq, query_block, N] tensors at a time).
    kernels : str, default "auto"
        SPARSEK implementation ("auto": Triton on CUDA, the torch reference elsewhere).
    detach_features : bool, default False
        Score detached k / v (the scorer then learns only through p of its own layer).
    """

    attn_name = ATTN_NAME

    def __init__(self, params: SparseKParams, query_block: int = 256, kernels: str = "auto",
                 detach_features: bool = False):
        register()
        self.params, self.query_block = params, query_block
        self.kernels, self.detach_features = kernels, detach_features

    def step_kwargs(self, sample: bool = True) -> dict:
        """A fresh `SparseKStep` per forward (`sample` is ignored: the rule is deterministic)."""
        return {"sparsek": SparseKStep(self.params, query_block=self.query_block,
                                       kernels=self.kernels,
                                       detach_features=self.detach_features)}

    def regularizer(self, kwargs: dict) -> tuple[torch.Tensor, dict]:
        """-> (zero penalty, metrics: p_top, free_top, free_top_min (`step_metrics`) and the
        mean slope)."""
        step: SparseKStep = kwargs["sparsek"]
        metrics = step_metrics(step)
        metrics["slope"] = self.params.slope.detach().mean().item()
        return self.params.weight.new_zeros(()), metrics
