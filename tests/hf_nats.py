# SPDX-License-Identifier: Apache-2.0
"""NAtS in Hugging Face transformers (no vLLM, no paged cache, no eviction): the
independent end-to-end reference for the `nats` backend.

Every attention call recomputes the types of all complete chunks from the whole K/V it
is given (post-RoPE, as HF caches them) with the contract's functions
(`vllm_sparse.nats.gates`), builds the `gates.visible` mask for its queries and attends
in float64. Nothing is kept between calls and nothing of the backend is used.
"""

import torch

from tests.hf_teacher import teacher_forced

from vllm_sparse.nats import gates as G


class NatsOracleAttention:
    """An HF attention function applying `gates.visible` at hard types; records, per
    decode call, the number of (KV head, token) pairs attended, each layer's last types,
    and how many LOCAL chunks a later GLOBAL chunk of the same head ended (last call)."""

    def __init__(self, gates: G.NatsGates):
        self.gates = gates
        self.attended: list[int] = []
        self.types: dict[int, torch.Tensor] = {}
        self.local_ended = 0

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                 **kwargs):
        assert query.shape[0] == 1, "the oracle runs one sequence"
        num_heads, q_len, kv_len = query.shape[1], query.shape[2], key.shape[2]
        hkv, size = key.shape[1], self.gates.chunk_size
        weight, bias = self.gates.layer(module.layer_idx)
        complete = kv_len // size * size
        features = G.chunk_features(key[0, :, :complete], value[0, :, :complete], size)
        types = G.chunk_types(G.gate_logits(features, weight, bias))
        self.types[module.layer_idx] = types
        self.local_ended = sum(_local_ended(t) for t in self.types.values())
        query_pos = torch.arange(kv_len - q_len, kv_len)
        mask = G.visible(types, size, self.gates.window, query_pos, kv_len)   # [Hkv, Q, K]
        if q_len == 1:
            self.attended.append(int(mask.sum()))
        group = num_heads // hkv
        mask = mask.repeat_interleave(group, dim=0)                              # [Hq, Q, K]
        k = key[0].double().repeat_interleave(group, dim=0)
        v = value[0].double().repeat_interleave(group, dim=0)
        scores = torch.einsum("hqd,hkd->hqk", query[0].double(), k) * scaling
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out = torch.einsum("hqk,hkd->qhd", probs, v)
        return out[None].to(query.dtype), None


def _local_ended(types: torch.Tensor) -> int:
    """LOCAL chunks [Hkv, n] followed, in their head, by a GLOBAL chunk."""
    count = 0
    for row in types.tolist():
        last_global = max((i for i, t in enumerate(row) if t == G.GLOBAL), default=-1)
        count += sum(1 for i, t in enumerate(row) if t == G.LOCAL and i < last_global)
    return count


def score(model_dir: str, gates: G.NatsGates, prompt_ids: list[int], generated: list[int]):
    """Teacher-forced greedy check of a generation (`hf_teacher.teacher_forced`): per
    generated token (log-prob, the reference's argmax, its top-2 margin), and the oracle."""
    oracle = NatsOracleAttention(gates)
    return teacher_forced(model_dir, "nats_oracle", oracle, prompt_ids, generated), oracle
