# SPDX-License-Identifier: Apache-2.0
"""Hugging Face transformers (no vLLM) decoding with the Radar oracle: the independent
end-to-end reference. Prefill is dense; every decode step attends to `radar_mask`."""

import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from tests.radar_oracle import radar_mask


class RadarOracleAttention:
    """An HF attention function; counts the tokens each decode query attends per KV head."""

    def __init__(self, config, block_size: int, budget: int):
        self.config, self.block_size, self.budget = config, block_size, budget
        self.attended = 0

    def __call__(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                 **kwargs):
        if query.shape[2] > 1:
            return sdpa_attention_forward(module, query, key, value, attention_mask,
                                          dropout=dropout, scaling=scaling, **kwargs)
        assert query.shape[0] == 1, "the oracle decodes one sequence"
        q, k, v = query[0, :, 0], key[0], value[0]                     # [Hq,D], [Hkv,T,D]
        mask = radar_mask(q, k, self.config, self.block_size, self.budget, scaling)
        self.attended += int(mask.sum())
        group = q.shape[0] // k.shape[0]
        scores = torch.einsum("hgd,htd->hgt", q.view(k.shape[0], group, -1).double(),
                              k.double()) * scaling
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        out = torch.einsum("hgt,htd->hgd", scores.softmax(-1), v.double())
        return out.reshape(1, 1, q.shape[0], -1).to(query.dtype), None


def generate(model_dir: str, prompt_ids: list[int], max_new_tokens: int, attention):
    """Greedy decoding; returns (token ids, log-prob of each chosen token)."""
    AttentionInterface.register("radar_oracle", attention)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="radar_oracle").eval()
    ids, logprobs, past = torch.tensor([prompt_ids]), [], None
    tokens = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logp = out.logits[0, -1].double().log_softmax(-1)
            token = int(logp.argmax())
            tokens.append(token)
            logprobs.append(float(logp[token]))
            ids = torch.tensor([[token]])
    return tokens, logprobs
