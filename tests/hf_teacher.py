# SPDX-License-Identifier: Apache-2.0
"""Teacher-forced scoring of a vLLM generation with a Hugging Face model whose attention is
an oracle (tests/hf_nats.py, tests/hf_sparsek.py)."""

import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_utils import AttentionInterface


def teacher_forced(model_dir: str, attn_name: str, attention, prompt_ids: list[int],
                   generated: list[int]) -> list[tuple[float, int, float]]:
    """Feed the prompt, then each generated token one decode step at a time, with
    `attention` registered as `attn_name`. Returns, for each generated token, (log-prob of
    that token, the reference's argmax, its top-2 log-prob margin)."""
    AttentionInterface.register(attn_name, attention)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation=attn_name).eval()
    ids, past, rows = torch.tensor([prompt_ids]), None, []
    with torch.no_grad():
        for token in generated:
            out = model(ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logp = out.logits[0, -1].double().log_softmax(-1)
            top = logp.topk(2)
            rows.append((float(logp[token]), int(top.indices[0]),
                         float(top.values[0] - top.values[1])))
            ids = torch.tensor([[token]])
    return rows
