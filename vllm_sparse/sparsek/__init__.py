# SPDX-License-Identifier: Apache-2.0
"""SparseK attention (https://arxiv.org/abs/2406.16747): learned per-token scores, a
sliding window plus the top-k older tokens per KV head, values scaled by SPARSEK(u, k).

- `scorer`: the scorer file format and the pure-torch attention rule (training and
  inference share it; see DESIGN.md);
- `hf_attention`: the rule as a transformers attention function (training / evaluation).
"""

from vllm_sparse.sparsek.scorer import (FORMAT, SparseKScorer, attention_rule, candidate_counts,
                                        evictable, order_ranks, scores, selected, value_weights)

__all__ = ["FORMAT", "SparseKScorer", "attention_rule", "candidate_counts", "evictable",
           "order_ranks", "scores", "selected", "value_weights"]
