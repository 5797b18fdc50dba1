# SPDX-License-Identifier: Apache-2.0
"""Prototype evicting policy, StreamingLLM (sinks + recent window): proves the eviction
machinery end to end. Not a user-facing method; tests select it by registering
`StreamingEvictionBackend` under the name `NAME` (tests/e2e/test_eviction.py).

Attention is Radar's at `budget = radar.num_sink_tokens + radar.local_window`, where Radar
selects no pages: each decode query attends exactly the first S tokens and the last W
(prefill is dense, as in every method). Eviction: once a request's prompt is complete and
its context is T tokens, no later query attends a token in [S, T + 1 - W) (the next
query's window starts at T + 1 - W and only moves forward), so every page entirely inside
is evicted. This policy could be computed by the scheduler, but it is decided here, on the
worker, from the step's metadata and sent through `vllm_sparse.eviction.channel`, exactly
as NAtS and SparseK must send their data-dependent decisions.
"""

import torch

from vllm_sparse.backend import RadarBackend, RadarImpl, SparseMetadata
from vllm_sparse.eviction import channel
from vllm_sparse.eviction.impl import EvictingBackend

NAME = "STREAMING_EVICT"
PATH = "vllm_sparse.eviction.streaming.StreamingEvictionBackend"


def streaming_evictable(seq_lens: list[int], prompt_lens: list[int], sinks: int, window: int,
                        block_size: int, num_pages: int) -> torch.Tensor:
    """[B, num_pages] bool: pages no query after this step attends, for rows whose context
    is `seq_lens` after the step; none while a row's prompt is incomplete."""
    seq_len = torch.tensor(seq_lens, dtype=torch.long)[:, None]
    first = torch.arange(num_pages) * block_size                     # first token of each page
    done = (seq_len >= torch.tensor(prompt_lens, dtype=torch.long)[:, None])
    return done & (first >= sinks) & (first + block_size <= seq_len + 1 - window)


class StreamingEvictionImpl(RadarImpl):
    """Radar at budget sinks + window, reporting the pages StreamingLLM evicts."""

    def _bind_layer(self, layer_name, kv_cache, dtype) -> None:
        super()._bind_layer(layer_name, kv_cache, dtype)
        radar = self.config.radar
        budget = radar.num_sink_tokens + radar.local_window
        if self.layer_method != "radar" or self.budget != budget:
            raise ValueError("vllm_sparse: the streaming-eviction prototype needs budget = "
                             "radar.num_sink_tokens + radar.local_window in every layer")

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                 output_scale, output_block_scale)
        md: SparseMetadata = attn_metadata
        if md is not None and md.prompt_lens is not None:
            radar, block_size = self.config.radar, kv_cache.shape[2]
            evictable = streaming_evictable(md.seq_lens_cpu, md.prompt_lens,
                                            radar.num_sink_tokens, radar.local_window,
                                            block_size, md.block_table.shape[1])
            channel.WORKER.report(layer.layer_name, md, evictable.to(kv_cache.device),
                                  block_size)
        return output


class StreamingEvictionBackend(EvictingBackend, RadarBackend):
    """Radar's backend with an evicting KV-cache spec and StreamingLLM eviction."""

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_impl_cls():
        return StreamingEvictionImpl
