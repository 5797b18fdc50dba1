# SPDX-License-Identifier: Apache-2.0
"""The worker -> scheduler channel of eviction decisions.

Worker side (`WORKER`, one per process):
* the metadata builder of an evicting KV-cache group calls `expect_block_size(size)`;
* each evicting layer calls `report(layer_name, metadata, evictable)` once per step, with
  `evictable` [B, P] bool over the rows of the step's metadata and the logical pages of
  their block table: True where the layer evicted every token of the page, for every KV
  head it holds, for good (reports are monotone: an evicted page stays evicted);
* `collect()` runs once per step after sampling (`vllm_sparse.eviction.patch`): it ANDs
  the reports over the layers (a page is freed only when every layer of the group evicted
  it) and over tensor-parallel ranks (`all_reduce(MIN)` on the TP CPU group: a block holds
  every rank's KV heads), drops what it already sent for this run of the request, and
  returns {request id: [(logical page, physical block id), ...]}, which travels to the
  scheduler with the step's `ModelRunnerOutput`. The layers of the group are those the
  step's forward context gives the same metadata; all of them must report.

Scheduler side: `apply(scheduler, evictions)` hands each running request's pages to the
`EvictingAttentionManager`s, which free them.

A request's run restarts (preemption, then recompute) when a step's context does not
continue where its last step ended; what was sent for it is then forgotten, so the
recompute's pages are reported again. The (page, block id) pairs let the scheduler ignore
decisions about blocks the request no longer holds.
"""

import logging
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("vllm.vllm_sparse")

Evictions = dict[str, list[tuple[int, int]]]
"""Request id -> (logical page index, physical block id) pairs to free."""


@dataclass
class _Step:
    """The reports of the step whose metadata is `metadata` (AND over layers so far)."""

    metadata: object
    evictable: torch.Tensor
    layers: set[str]
    expected: frozenset[str]


@dataclass
class _Sent:
    """What was sent for one run of a request: its context after its last step, pages."""

    seq_len: int = 0
    pages: set[int] = field(default_factory=set)


class WorkerChannel:
    def __init__(self):
        self.block_size: int | None = None
        self._step: _Step | None = None
        self._sent: dict[tuple, _Sent] = {}
        self._warned: set[str] = set()

    def expect_block_size(self, block_size: int) -> None:
        """The KV-cache manager's block size of the evicting group (its builder's spec)."""
        self.block_size = block_size

    def report(self, layer_name: str, metadata, evictable: torch.Tensor,
               block_size: int) -> None:
        """This layer's evicted pages [B, P] (bool) for the rows of `metadata`, pages of
        `block_size` tokens (the kernel block size, which must be the manager's)."""
        if block_size != self.block_size:
            raise NotImplementedError(
                f"vllm_sparse: KV eviction needs kernel blocks of the KV-cache manager's size "
                f"({self.block_size} tokens), got {block_size}")
        if metadata.request_keys is None:
            self._warn("no-keys", "vllm_sparse: no request identity from the model runner "
                       "(V1 runner needed): evicted pages are not freed")
            return
        step = self._step
        if step is None or step.metadata is not metadata:   # a new step
            self._step = _Step(metadata, evictable.clone(), {layer_name},
                               _group_layers(metadata))
        else:
            step.evictable &= evictable
            step.layers.add(layer_name)

    def collect(self) -> Evictions:
        """Pages to free after this step (see module docstring); resets the step."""
        step, self._step = self._step, None
        if step is None:
            return {}
        if step.layers != step.expected:
            self._warn("layers", f"vllm_sparse: a step's eviction reports came from "
                       f"{len(step.layers)} of the {len(step.expected)} layers of the group; "
                       "its pages are kept (logged once)")
            return {}
        md = step.metadata
        evictable = _on_every_rank(step.evictable.cpu())
        block_table = md.block_table.cpu()
        if md.live_requests is not None:
            self._sent = {k: v for k, v in self._sent.items() if k in md.live_requests}
        out: Evictions = {}
        for row, key in enumerate(md.request_keys):
            seq_len = md.seq_lens_cpu[row]
            query_len = md.query_start_loc[row + 1] - md.query_start_loc[row]
            sent = self._sent.get(key)
            if sent is None or sent.seq_len != seq_len - query_len:   # a new run
                sent = self._sent[key] = _Sent()
            sent.seq_len = seq_len
            pages = [p for p in torch.nonzero(evictable[row]).flatten().tolist()
                     if p not in sent.pages]
            if pages:
                sent.pages.update(pages)
                out[key[0]] = [(p, int(block_table[row, p])) for p in pages]
        return out

    def _warn(self, what: str, message: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            logger.warning(message)


def _group_layers(metadata) -> frozenset[str]:
    """The layers that share `metadata` in the current forward pass (one KV-cache group
    and backend)."""
    from vllm.forward_context import get_forward_context

    by_layer = get_forward_context().attn_metadata
    if isinstance(by_layer, list):              # speculative decoding: [0] is the target's
        by_layer = by_layer[0]
    return frozenset(name for name, value in by_layer.items() if value is metadata)


def _on_every_rank(evictable: torch.Tensor) -> torch.Tensor:
    """AND of `evictable` over the tensor-parallel group (identity without TP)."""
    from vllm.distributed.parallel_state import get_tp_group, model_parallel_is_initialized

    if not model_parallel_is_initialized() or get_tp_group().world_size == 1:
        return evictable
    flags = evictable.to(torch.uint8)
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN,
                                 group=get_tp_group().cpu_group)
    return flags.bool()


WORKER = WorkerChannel()


def apply(scheduler, evictions: Evictions) -> int:
    """Free the pages of `evictions` in the scheduler's evicting managers; returns the
    number of pages freed. Requests that finished or were preempted since are skipped."""
    from vllm.v1.request import RequestStatus

    from vllm_sparse.eviction.cache import EvictingAttentionManager

    managers = [m for m in scheduler.kv_cache_manager.coordinator.single_type_managers
                if isinstance(m, EvictingAttentionManager)]
    freed = 0
    for req_id, pages in evictions.items():
        request = scheduler.requests.get(req_id)
        if request is None or request.status != RequestStatus.RUNNING:
            continue
        for manager in managers:
            freed += manager.evict(req_id, pages)
    return freed
