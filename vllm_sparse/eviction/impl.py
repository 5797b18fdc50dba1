# SPDX-License-Identifier: Apache-2.0
"""The attention impl shared by methods with trained weights that free KV pages (NAtS,
SparseK): load the weights, check them against the model, take this tensor-parallel rank's
KV heads, and after each step report to the eviction channel the pages the method evicted.
"""

import logging
from pathlib import Path

import torch

from vllm.config import get_current_vllm_config
from vllm_sparse.backend import (SparseAttentionBackend, SparseAttentionImpl, SparseMetadata,
                                 SparseMetadataBuilder, _layer_index)
from vllm_sparse.eviction import channel
from vllm_sparse.mechanism import make_mechanism, resolve_kernels

logger = logging.getLogger("vllm.vllm_sparse")


def check_model(weights, path, num_layers: int, num_kv_heads: int, head_size: int,
                what: str) -> None:
    """Trained weights (`weights.PerKVHeadWeights`: `NatsGates`, `SparseKScorer`) must be
    made for this model (all of its KV heads, before TP slicing)."""
    for name, have, model in (("layers", weights.num_layers, num_layers),
                              ("KV heads", weights.num_kv_heads, num_kv_heads),
                              ("head size", weights.head_size, head_size)):
        if have != model:
            raise ValueError(f"vllm_sparse: {what} {path} have {name}={have}, the model "
                             f"has {model}; allowed: weights trained for this model "
                             f"({num_layers} layers, {num_kv_heads} KV heads, head size "
                             f"{head_size})")


def rank_heads(total: int, local: int, tp_rank: int, tp_size: int) -> slice:
    """This rank's KV heads among the model's `total` (vLLM's QKVParallelLinear split:
    contiguous slices, or one replicated head each when total < tp_size)."""
    if total >= tp_size:
        if total != local * tp_size:
            raise ValueError(f"vllm_sparse: {local} KV heads per rank x {tp_size} ranks "
                             f"!= {total} KV heads")
        return slice(tp_rank * local, (tp_rank + 1) * local)
    head = tp_rank // (tp_size // total)
    return slice(head, head + 1)


class EvictingMetadataBuilder(SparseMetadataBuilder):
    """The shared metadata, plus the eviction channel's block size (the group's spec)."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        channel.WORKER.expect_block_size(kv_cache_spec.block_size)


class EvictingBackend(SparseAttentionBackend):
    """Base of the evicting methods' backends: full attention becomes the evicting KV-cache
    spec, whose pages the scheduler frees when every layer (and TP rank) evicted them; the
    metadata builder tells the eviction channel the block size (`EvictingMetadataBuilder`)."""

    @classmethod
    def customize_spec(cls, spec):
        from vllm_sparse.eviction.cache import evicting_spec

        return evicting_spec(spec)

    @staticmethod
    def get_builder_cls():
        return EvictingMetadataBuilder


class EvictingImpl(SparseAttentionImpl):
    """Base of the evicting methods' impls.

    forward: query [T, Hq, D], key/value [T, Hkv, D], kv_cache [num_blocks, Hkv,
    block_size, 2D], output [T, Hq, D]. Subclasses give `weights_name` and implement
    `_load_weights() -> (weights, path)`, `_bind_policy(layer_index, device)` (this layer's
    policy from `self.weights` and `self.heads`) and `_attend(md, query, kv_cache, out) ->
    evictable [B, num_pages] bool` (attend, then the pages evicted after this step).
    """

    weights_name: str = "weights"

    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, *args, **kwargs):
        super().__init__(num_heads, head_size, scale, num_kv_heads, *args, **kwargs)
        from vllm.distributed import (get_tensor_model_parallel_rank,
                                      get_tensor_model_parallel_world_size)

        model = get_current_vllm_config().model_config
        self.weights, path = self._load_weights()
        total = model.get_total_num_kv_heads()
        check_model(self.weights, path, model.hf_text_config.num_hidden_layers, total,
                    self.head_size, self.weights_name)
        self.heads = rank_heads(total, self.num_kv_heads, get_tensor_model_parallel_rank(),
                                get_tensor_model_parallel_world_size())

    def _load_weights(self) -> tuple[object, Path]:
        raise NotImplementedError

    def _bind_policy(self, index: int, device: torch.device) -> None:
        raise NotImplementedError

    def _attend(self, md: SparseMetadata, query, kv_cache, out) -> torch.Tensor:
        raise NotImplementedError

    def _bind_layer(self, layer_name: str, kv_cache: torch.Tensor, dtype: torch.dtype) -> None:
        self.mechanism = make_mechanism(resolve_kernels(self.config.kernels, kv_cache.device, dtype))
        self.layer_method = self.method
        index = _layer_index(layer_name)
        if index is None or not 0 <= index < self.weights.num_layers:
            raise ValueError(f"vllm_sparse: {self.method} cannot find the layer index of "
                             f"{layer_name!r} (the {self.weights_name} hold layers 0.."
                             f"{self.weights.num_layers - 1})")
        self._bind_policy(index, kv_cache.device)

    def _step(self, layer, md: SparseMetadata, query, out, kv_cache) -> None:
        evictable = self._attend(md, query, kv_cache, out)
        channel.WORKER.report(layer.layer_name, md, evictable, kv_cache.shape[2])
