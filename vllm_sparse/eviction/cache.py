# SPDX-License-Identifier: Apache-2.0
"""The KV-cache spec and manager of evicting layers (scheduler side of KV eviction).

`EvictingAttentionSpec` is full attention whose pages a worker may declare evicted for
good: every token of the page, for every KV head of every layer of the group, on every
tensor-parallel rank, will never be attended again by this request. A backend opts in
by returning it from `customize_spec` (`evicting_spec`); vLLM pickles it to the engine
core, whose scheduler then builds `EvictingAttentionManager` for the group (found
through vLLM's `KVCacheSpecRegistry`; `register()` runs when this module is imported).

`EvictingAttentionManager.evict` frees such pages mid-request the way vLLM's sliding
window frees pages outside its window: the request's entry becomes the null block and
the page goes back to the block pool, so the scheduler can admit more work. Holes break
prefix caching, so the spec is not prefix-cacheable (the manager finds no hits and caches
nothing); the manager says so once at start-up.
"""

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, replace_as
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

logger = logging.getLogger("vllm.vllm_sparse")


@dataclass(frozen=True, kw_only=True)
class EvictingAttentionSpec(FullAttentionSpec):
    """Full attention whose evicted pages are freed while the request runs.

    Its own grouping type: layers with this spec never share a KV-cache group (a block
    table) with plain full-attention layers, whose pages must not be freed.
    """

    @property
    def prefix_cacheable(self) -> bool:
        return False

    @classmethod
    def merge(cls, specs: list["EvictingAttentionSpec"]) -> "EvictingAttentionSpec":
        if not all(isinstance(spec, EvictingAttentionSpec) for spec in specs):
            raise AssertionError("evicting and non-evicting layers cannot share a KV-cache group")
        return replace_as(FullAttentionSpec.merge(specs), cls)


def evicting_spec(spec: AttentionSpec) -> AttentionSpec:
    """`customize_spec` of an evicting backend: full attention becomes evicting."""
    if type(spec) is FullAttentionSpec:
        return replace_as(spec, EvictingAttentionSpec)
    if isinstance(spec, EvictingAttentionSpec):
        return spec
    raise NotImplementedError(f"vllm_sparse: KV eviction supports full-attention layers only, "
                              f"got {type(spec).__name__}")


class EvictingAttentionManager(FullAttentionManager):
    """Full-attention manager that also frees pages the workers evicted (`evict`)."""

    def __init__(self, kv_cache_spec: EvictingAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.num_evicted_blocks = 0
        """Pages returned to the pool by `evict` (all requests, since start-up)."""
        logger.info(
            "vllm_sparse: KV eviction on for KV-cache group %d (block size %d): evicted "
            "pages return to the free pool while requests run; prefix caching is off for "
            "these layers (evicted pages leave holes)", self.kv_cache_group_id, self.block_size)

    @classmethod
    def find_longest_cache_hit(cls, block_hashes, max_length, kv_cache_group_ids, *args,
                               **kwargs):
        return tuple([] for _ in kv_cache_group_ids), 0

    def evict(self, request_id: str, pages: Iterable[tuple[int, int]]) -> int:
        """Free the request's pages given as (logical page index, physical block id).

        A page is freed only while that block still holds that page of the request: pages
        already freed, past the request's blocks, or given with another block id (a
        decision about an earlier run of a preempted request) are skipped. Returns the
        number of pages freed.
        """
        blocks = self.req_to_blocks.get(request_id)
        if not blocks:
            return 0
        freed = []
        for page, block_id in pages:
            if 0 <= page < len(blocks) and not blocks[page].is_null \
                    and blocks[page].block_id == block_id:
                freed.append(blocks[page])
                blocks[page] = self._null_block
        if freed:
            self.block_pool.free_blocks(freed)
            self.num_evicted_blocks += len(freed)
        return len(freed)


def register() -> None:
    """Register the spec and its manager with vLLM and install the decisions' channel
    (`vllm_sparse.eviction.patch`). Idempotent. Runs when this module is imported, which
    happens in every process that meets the spec before vLLM looks it up: the worker
    (the backend's `customize_spec`) and the engine core (unpickling the workers' specs,
    or the same process). vLLM's own specs are registered first, since vLLM skips them
    once the registry holds any."""
    from vllm_sparse.eviction import patch

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(EvictingAttentionSpec, EvictingAttentionManager,
                                 uniform_type_base_spec=EvictingAttentionSpec)
    patch.install()


register()
