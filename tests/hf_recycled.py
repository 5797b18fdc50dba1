# SPDX-License-Identifier: Apache-2.0
"""Recycled Attention as the paper describes it, in Hugging Face transformers (no vLLM):
the independent end-to-end reference for `vllm_sparse.policies.recycled`.

The partial cache is a literal list per layer and KV head, as in RefreshKV's Algorithm 1:
a full step attends to everything and refills it with the top-K positions (max over the
group's query heads, max-pooled over positions) in ascending score order; a partial step
appends the current token, drops the lowest entry when the list is longer than K, and
attends to the list. Everything in float64.
"""

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward


class RecycledOracleAttention:
    """An HF attention function; counts the tokens each decode query attends per KV head."""

    def __init__(self, budget: int, schedule: str = "fixed", stride: int = 16,
                 check_every: int = 5, threshold: float = 0.85, pool_width: int = 7):
        self.budget, self.schedule, self.stride = budget, schedule, stride
        self.check_every, self.threshold, self.pool_width = check_every, threshold, pool_width
        self.attended = 0
        self.full_steps = 0
        self.layers: dict[int, dict] = {}

    def _probs(self, q, k, scaling, length):
        """Group-max attention weights [Hkv, length] of q [Hkv, G, D] over k [Hkv, T, D]."""
        scores = torch.einsum("hgd,htd->hgt", q, k[:, :length]) * scaling
        return scores.softmax(-1).amax(1)

    def _refill(self, probs: torch.Tensor, length: int) -> list[int]:
        pooled = F.max_pool1d(probs[None, None], self.pool_width, 1, self.pool_width // 2)[0, 0]
        best = torch.sort(pooled[:length], descending=True, stable=True).indices
        return best[: min(self.budget, length)].tolist()[::-1]   # ascending score

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                 **kwargs):
        assert query.shape[0] == 1, "the oracle decodes one sequence"
        hkv, length = key.shape[1], key.shape[2]
        group = query.shape[1] // hkv
        layer = self.layers.setdefault(module.layer_idx, {})
        k, v = key[0].double(), value[0].double()
        if query.shape[2] > 1:   # dense prefill; the last prompt token is the first full step
            out = sdpa_attention_forward(module, query, key, value, attention_mask,
                                         dropout=dropout, scaling=scaling, **kwargs)
            q = query[0, :, -1].double().view(hkv, group, -1)
            probs = self._probs(q, k, scaling, length)
            layer.update(prompt_end=length - 1,
                         cache=[self._refill(probs[h], length) for h in range(hkv)],
                         ref=[F.normalize(q[h].mean(0), dim=0) for h in range(hkv)])
            return out
        q = query[0, :, 0].double().view(hkv, group, -1)
        position = length - 1
        step = position - layer["prompt_end"]
        probs = self._probs(q, k, scaling, length)
        outs = []
        for h in range(hkv):
            unit = F.normalize(q[h].mean(0), dim=0)
            if self.schedule == "fixed":
                full = step % self.stride == 0
            else:
                full = (step % self.check_every == 0
                        and float(unit @ layer["ref"][h]) < self.threshold)
            if full:
                attend = list(range(length))
                layer["cache"][h] = self._refill(probs[h], length)
                layer["ref"][h] = unit
                self.full_steps += 1
            else:
                cache = layer["cache"][h]
                cache.append(position)
                if len(cache) > self.budget:
                    cache.pop(0)
                attend = list(cache)
            self.attended += len(attend)
            idx = torch.tensor(attend)
            weights = (torch.einsum("gd,td->gt", q[h], k[h, idx]) * scaling).softmax(-1)
            outs.append(weights @ v[h, idx])
        out = torch.stack(outs).reshape(1, 1, hkv * group, -1)
        return out.to(query.dtype), None
