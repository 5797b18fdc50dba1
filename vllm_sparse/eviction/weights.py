# SPDX-License-Identifier: Apache-2.0
"""The shape contract of trained per-KV-head weights (`NatsGates`, `SparseKScorer`), read by
`impl.check_model` at start-up. Pure torch, no vLLM import (training uses it too)."""

import torch


class PerKVHeadWeights:
    """Mixin for weights laid out as `weight` [layers, kv_heads, ..., 2 * head_size]: one set
    per (layer, KV head), features concat(k, v) of that head (so the last dim is twice the
    head size)."""

    weight: torch.Tensor

    @property
    def num_layers(self) -> int:
        return self.weight.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.weight.shape[1]

    @property
    def head_size(self) -> int:
        return self.weight.shape[-1] // 2
