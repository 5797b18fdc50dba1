# SPDX-License-Identifier: Apache-2.0
"""SparseK in Hugging Face transformers (no vLLM, no paged cache, no slots, no eviction):
the end-to-end reference for the `sparsek` backend.

Every attention call scores all the K/V it is given (post-RoPE, as HF caches them) with
the contract's functions (`vllm_sparse.sparsek.scorer`: `scores`, `attention_rule`, whose
masks and SPARSEK weights are checked against a per-query loop in
tests/unit/test_sparsek_scorer.py) and attends in float64. Nothing is kept between calls:
the backend's incremental state (compaction into k slots, the live scores behind tau, the
eviction of pages) plays no part here.
"""

import torch

from tests.hf_teacher import teacher_forced

from vllm_sparse.sparsek.scorer import SparseKScorer, attention_rule, scores


class SparseKOracleAttention:
    """An HF attention function applying `scorer.attention_rule`; records, per decode call,
    the number of (KV head, token) pairs attended."""

    def __init__(self, scorer: SparseKScorer, k: int):
        self.scorer, self.k = scorer, k
        self.attended: list[int] = []

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                 **kwargs):
        assert query.shape[0] == 1, "the oracle runs one sequence"
        num_heads, q_len, kv_len = query.shape[1], query.shape[2], key.shape[2]
        hkv = key.shape[1]
        k, v = key[0].double(), value[0].double()
        weight, bias, slope = (t.double() for t in self.scorer.layer(module.layer_idx))
        u = scores(k, v, weight, bias, slope, torch.arange(kv_len))
        query_pos = torch.arange(kv_len - q_len, kv_len)
        attended, weights = attention_rule(u, self.k, self.scorer.window, query_pos, "torch")
        if q_len == 1:
            self.attended.append(int(attended.sum()))
        group = num_heads // hkv
        attended = attended.repeat_interleave(group, dim=0)                       # [Hq, Q, K]
        weights = weights.repeat_interleave(group, dim=0)
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
        logits = torch.einsum("hqd,hkd->hqk", query[0].double(), k) * scaling
        probs = logits.masked_fill(~attended, float("-inf")).softmax(-1) * weights
        out = torch.einsum("hqk,hkd->qhd", probs, v)
        return out[None].to(query.dtype), None


def score(model_dir: str, scorer: SparseKScorer, k: int, prompt_ids: list[int],
          generated: list[int]):
    """Teacher-forced greedy check of a generation (`hf_teacher.teacher_forced`): per
    generated token (log-prob, the reference's argmax, its top-2 margin), and the oracle."""
    oracle = SparseKOracleAttention(scorer, k)
    return teacher_forced(model_dir, "sparsek_oracle", oracle, prompt_ids, generated), oracle
