# SPDX-License-Identifier: Apache-2.0
"""The sparse attention backend shared by every method: vLLM glue only.

One decode step, per layer: write K/V into the paged cache, let the policy update its
per-page state, run prefill rows densely (or, in evaluation mode, as decode steps),
ask the policy which pages each decode query attends, attend to exactly those.
"""

import logging
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.config import get_current_vllm_config
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionImpl,
                                       AttentionMetadataBuilder, AttentionType,
                                       CommonAttentionMetadata, MultipleOf)
from vllm_sparse import reference, runner_patch
from vllm_sparse.config import SparseConfig, resolve_from_vllm
from vllm_sparse.mechanism import make_mechanism, resolve_kernels
from vllm_sparse.policies.base import DecodeQueries, SparsePolicy
from vllm_sparse.policies.radar import RadarPolicy
from vllm_sparse.policies.recycled import RecycledPolicy

logger = logging.getLogger("vllm.vllm_sparse")
SUPPORTED_HEAD_SIZES = [32, 64, 80, 96, 112, 128, 160, 192, 256]
EVAL_CHUNK = 256
"""Prefill queries evaluated as decode steps per chunk (bounds memory in eval mode)."""


@dataclass
class SparseMetadata:
    """Per-step tensors, built once per step for all layers.

    query_start_loc: [B + 1] (host list); seq_lens: [B] context incl. new tokens;
    block_table: [B, max_pages]; slot_mapping: [T]; decode_rows: [Nd] rows with one new
    token, decode_token_index: [Nd] their tokens; prefill_rows: host list of the other
    rows, prefill_token_index: [Tp] their tokens, prefill_query_start_loc: [P + 1] starts
    of each prefill row within those.
    """

    num_actual_tokens: int
    query_start_loc: list[int]
    seq_lens: torch.Tensor
    seq_lens_cpu: list[int]
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    decode_rows: torch.Tensor
    decode_token_index: torch.Tensor
    prefill_rows: list[int]
    prefill_token_index: torch.Tensor
    prefill_query_start_loc: list[int]
    request_keys: list = None
    prompt_lens: list = None
    live_requests: frozenset | None = None

    def sparse_from(self, row: int, eval_from: int | None) -> int:
        """First position of `row` that attends as a decode step: the prompt length (a
        recompute after preemption replays the generated tokens' decode steps), or the
        evaluation start if smaller; the end of the chunk when the prompt length is unknown."""
        prompt = self.prompt_lens[row] if self.prompt_lens else None
        limit = self.seq_lens_cpu[row] if prompt is None else prompt
        return limit if eval_from is None else min(limit, eval_from)

    def request_key(self, row: int):
        return self.request_keys[row] if self.request_keys else None


class SparseMetadataBuilder(AttentionMetadataBuilder[SparseMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if vllm_config.use_v2_model_runner:
            _refuse_v2_runner(vllm_config)
        runner_patch.install()

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> SparseMetadata:
        cm = common_attn_metadata
        starts = cm.query_start_loc_cpu[: cm.num_reqs + 1].tolist()
        seq_lens = cm.seq_lens[: cm.num_reqs]
        query_lens = [b - a for a, b in zip(starts[:-1], starts[1:])]
        decode = [i for i, n in enumerate(query_lens) if n == 1]
        prefill = [i for i, n in enumerate(query_lens) if n > 1]
        prefill_starts = [0]
        for i in prefill:
            prefill_starts.append(prefill_starts[-1] + query_lens[i])
        device = seq_lens.device
        batch = runner_patch.current_batch()
        if batch is not None and len(batch.keys) < cm.num_reqs:
            batch = None
        return SparseMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            query_start_loc=starts,
            seq_lens=seq_lens,
            seq_lens_cpu=seq_lens.cpu().tolist(),
            block_table=cm.block_table_tensor[: cm.num_reqs],
            slot_mapping=cm.slot_mapping[: cm.num_actual_tokens],
            decode_rows=torch.tensor(decode, dtype=torch.long, device=device),
            decode_token_index=torch.tensor([starts[i] for i in decode], dtype=torch.long,
                                            device=device),
            prefill_rows=prefill,
            prefill_token_index=torch.tensor(
                [t for i in prefill for t in range(starts[i], starts[i + 1])], dtype=torch.long,
                device=device),
            prefill_query_start_loc=prefill_starts,
            request_keys=batch.keys[: cm.num_reqs] if batch else None,
            prompt_lens=batch.prompt_lens[: cm.num_reqs] if batch else None,
            live_requests=batch.live if batch else None,
        )


STATEFUL_METHODS = ("recycled", "nats", "sparsek")
EVICTING_METHODS = ("nats", "sparsek")


def _refuse_v2_runner(vllm_config) -> None:
    """Stateful methods need the V1 runner's request identity; others lose only the exact
    replay of generated tokens after a preemption (logged)."""
    backend = vllm_config.attention_config.backend
    method = getattr(backend.get_class(), "method", None) if backend is not None else None
    config = resolve_from_vllm(vllm_config, method)
    methods = {config.for_layer(None)[0]} | {config.for_layer(i)[0] for i in config.layers}
    if methods & set(STATEFUL_METHODS):
        raise ValueError(
            f"vllm_sparse: method {config.method} keeps per-request state and needs vLLM's V1 "
            "model runner (the V2 runner gives attention backends no request identity); "
            "set VLLM_USE_V2_MODEL_RUNNER=0")
    logger.warning("vllm_sparse: vLLM's V2 model runner gives no prompt lengths: after a "
                   "preemption, generated tokens are recomputed with dense attention "
                   "(VLLM_USE_V2_MODEL_RUNNER=0 replays them exactly)")


@dataclass
class AttendedStats:
    """Counters exposed for tests: decode queries (per KV head), tokens attended, context."""

    queries: int = 0
    attended_tokens: int = 0
    context_tokens: int = 0
    dense_queries: int = 0
    full_steps: int = 0
    """Recycled: (query, KV head) pairs that did a full step."""


def _layer_index(layer_name: str) -> int | None:
    match = re.search(r"\.(\d+)\.", f".{layer_name}.")
    return int(match.group(1)) if match else None


class SparseAttentionImpl(AttentionImpl):
    """Writes K/V, runs dense prefill, and sparse decode through the layer's policy.

    forward: query [T, Hq, D], key/value [T, Hkv, D], kv_cache [num_blocks, Hkv,
    block_size, 2D] (any strides), output [T, Hq, D].
    """

    method: ClassVar[str | None] = None

    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None,
                 sliding_window=None, kv_cache_dtype="auto", logits_soft_cap=None,
                 attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None, **kwargs):
        unsupported = {"alibi_slopes": alibi_slopes, "sliding_window": sliding_window,
                       "logits_soft_cap": logits_soft_cap or None,
                       "kv_sharing_target_layer_name": kv_sharing_target_layer_name,
                       "sinks": kwargs.get("sinks")}
        for name, value in unsupported.items():
            if value is not None:
                raise NotImplementedError(f"vllm_sparse: {name}={value!r} is not supported")
        if attn_type != AttentionType.DECODER:
            raise NotImplementedError(f"vllm_sparse: attn_type={attn_type!r} is not supported; "
                                      "supported: decoder")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.config: SparseConfig = resolve_from_vllm(get_current_vllm_config(), self.method)
        if self.config.method in EVICTING_METHODS and self.method != self.config.method:
            raise NotImplementedError(f"vllm_sparse: {self.config.method} frees KV pages and "
                                      "needs its own backend: use --attention-backend "
                                      f"{self.config.method}, not custom")
        self.layer_method: str | None = None
        self.budget = None
        self.policy: SparsePolicy | None = None
        self.mechanism = None
        self.recycled: RecycledPolicy | None = None
        self.stats = AttendedStats()

    def _bind_layer(self, layer_name: str, kv_cache: torch.Tensor, dtype: torch.dtype) -> None:
        """First real forward: the layer's method and budget, and torch or Triton mechanism."""
        self.mechanism = make_mechanism(resolve_kernels(self.config.kernels, kv_cache.device, dtype))
        self.layer_method, self.budget = self.config.for_layer(_layer_index(layer_name))
        if self.layer_method == "radar":
            self.policy = RadarPolicy(self.config.radar, self.head_size, self.scale,
                                      kernels=self.mechanism.name)
        elif self.layer_method == "recycled":
            self.recycled = RecycledPolicy(self.config.recycled, self.num_kv_heads)

    def _begin(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
               output_block_scale):
        """Shared start of every forward: checks, the layer's binding on its first real
        forward, the K/V write. -> (metadata, query [n, Hq, D], out [n, Hq, D] view of
        output), or None for vLLM's profiling run (output zeroed)."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("vllm_sparse: fused output quantization is not supported")
        if attn_metadata is None:  # profiling run
            output.fill_(0)
            return None
        if self.mechanism is None:
            self._bind_layer(layer.layer_name, kv_cache, query.dtype)
        md: SparseMetadata = attn_metadata
        n = md.num_actual_tokens
        self.mechanism.write_kv(kv_cache, key[:n], value[:n], md.slot_mapping)
        return (md, query[:n].view(n, self.num_heads, self.head_size),
                output[:n].view(n, self.num_heads, self.head_size))

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        step = self._begin(layer, query, key, value, kv_cache, attn_metadata, output,
                           output_scale, output_block_scale)
        if step is not None:
            self._step(layer, *step, kv_cache)
        return output

    def _step(self, layer, md: SparseMetadata, query, out, kv_cache) -> None:
        """One step of the layer after the K/V write: query, out [n, Hq, D]."""
        if self.policy is not None:
            self.policy.observe_write(kv_cache, md.slot_mapping)
        if self.recycled is not None:
            self._forward_recycled(query, kv_cache, md, out)
            return
        if md.prefill_rows:
            self._prefill(query, kv_cache, md, out)
        if not md.decode_rows.numel():
            return
        if not md.prefill_rows:     # decode only: token i is row i's query (no gathers)
            out.copy_(self._attend_as_decode(query, md.seq_lens, md.block_table, kv_cache))
        else:
            q = query[md.decode_token_index]
            seq_lens = md.seq_lens[md.decode_rows]
            out[md.decode_token_index] = self._attend_as_decode(
                q, seq_lens, md.block_table[md.decode_rows], kv_cache)

    def _dense_prefill(self, query, kv_cache, md: SparseMetadata, out) -> None:
        rows = md.prefill_rows
        index = md.prefill_token_index
        prefill_out = torch.empty_like(query[index])
        self.mechanism.prefill(query[index], kv_cache, md.block_table[rows],
                               md.prefill_query_start_loc, [md.seq_lens_cpu[r] for r in rows],
                               self.scale, prefill_out)
        out[index] = prefill_out

    def _prefill(self, query, kv_cache, md: SparseMetadata, out) -> None:
        self._dense_prefill(query, kv_cache, md, out)
        if self.policy is not None:
            for row in md.prefill_rows:
                self._prefill_as_decode(row, query, kv_cache, md, out)

    def _prefill_as_decode(self, row, query, kv_cache, md: SparseMetadata, out) -> None:
        """Prefill queries at positions >= md.sparse_from(row) attend as decode steps
        (evaluation mode, and the generated tokens of a recompute after preemption)."""
        start, end = md.query_start_loc[row], md.query_start_loc[row + 1]
        first_pos = md.seq_lens_cpu[row] - (end - start)
        skip = max(0, md.sparse_from(row, self.config.eval_sparse_prefill_from) - first_pos)
        for chunk in range(start + skip, end, EVAL_CHUNK):
            stop = min(chunk + EVAL_CHUNK, end)
            positions = torch.arange(chunk - start + first_pos, stop - start + first_pos,
                                     device=query.device)
            out[chunk:stop] = self._attend_as_decode(
                query[chunk:stop], positions + 1,
                md.block_table[row].expand(stop - chunk, -1), kv_cache, gather=False)

    # ------------------------------------------------------------ Recycled Attention
    def _forward_recycled(self, query, kv_cache, md: SparseMetadata, out) -> None:
        """Dense prefill (the chunk's decode-step positions replayed by the policy), then
        decode rows: full steps densely with scores, partial steps over their tokens."""
        self.recycled.forget(md.live_requests)
        if md.request_keys is None and not _no_identity_logged:
            _no_identity_logged.add(True)
            logger.warning("vllm_sparse: no request identity from the model runner: recycled "
                           "decode steps run as full (dense) steps (logged once)")
        if md.prefill_rows:
            self._dense_prefill(query, kv_cache, md, out)
            for row in md.prefill_rows:
                self._recycled_chunk(row, query, kv_cache, md, out)
        if md.decode_rows.numel():
            self._recycled_decode(query, kv_cache, md, out)

    def _recycled_chunk(self, row, query, kv_cache, md: SparseMetadata, out) -> None:
        start, end = md.query_start_loc[row], md.query_start_loc[row + 1]
        seq_len = md.seq_lens_cpu[row]
        first = seq_len - (end - start)
        chunk_query = query[start:end]
        positions = torch.arange(seq_len, device=query.device)
        key, value = reference.gather_kv(kv_cache, md.block_table[row][None],
                                         positions.expand(1, self.num_kv_heads, -1))

        def scores_fn(events: list[int]) -> torch.Tensor:
            at = torch.tensor(events, device=query.device)
            valid = (positions <= at[:, None, None]).expand(-1, self.num_kv_heads, -1)
            return reference.group_max_probs(chunk_query[at - first], key, valid, self.scale)

        _, masks, num_full = self.recycled.emulate(
            md.request_key(row), first, seq_len,
            md.sparse_from(row, self.config.eval_sparse_prefill_from), chunk_query,
            scores_fn, self._budgets)
        for lo, hi, valid in masks:
            rows = slice(start + lo - first, start + hi - first)
            out[rows] = reference.masked_attention(query[rows], key, value, valid, self.scale)
            self._count(valid.sum(-1), torch.arange(lo + 1, hi + 1, device=query.device), 0)
        self.stats.full_steps += num_full

    def _recycled_decode(self, query, kv_cache, md: SparseMetadata, out) -> None:
        rows = md.decode_rows.tolist()
        tokens = md.decode_token_index
        q = query[tokens]
        seq_lens = md.seq_lens[md.decode_rows].long()
        block_table = md.block_table[md.decode_rows]
        positions = [md.seq_lens_cpu[r] - 1 for r in rows]
        keys = [md.request_key(r) for r in rows]
        budgets = self._budgets(seq_lens)
        prompt_ends = ([md.prompt_lens[r] - 1 == p for r, p in zip(rows, positions)]
                       if md.prompt_lens else None)
        plan = self.recycled.plan_decode(keys, positions, q, budgets, prompt_ends)
        full_rows = torch.nonzero(plan.full.any(-1)).flatten()
        partial_rows = torch.nonzero(~plan.full.all(-1)).flatten()
        result = torch.empty_like(q)
        scores = None
        stats = self.stats
        if full_rows.numel():
            result[full_rows], scores = self.mechanism.decode_with_scores(
                q[full_rows], kv_cache, block_table[full_rows], seq_lens[full_rows], self.scale)
        if partial_rows.numel():
            partial, attended = self.mechanism.decode_tokens(
                q[partial_rows], kv_cache, block_table[partial_rows], seq_lens[partial_rows],
                plan.tokens[partial_rows], self.scale)
            group = self.num_heads // self.num_kv_heads
            head_full = plan.full[partial_rows].repeat_interleave(group, dim=1)[..., None]
            result[partial_rows] = torch.where(head_full, result[partial_rows], partial)
            stats.attended_tokens += int((attended * ~plan.full[partial_rows]).sum())
        stats.attended_tokens += int((plan.full * seq_lens[:, None]).sum())
        stats.queries += plan.full.numel()
        stats.context_tokens += int(seq_lens.sum()) * self.num_kv_heads
        stats.full_steps += int(plan.full.sum())
        stats.dense_queries += int(plan.full.all(-1).sum())
        out[tokens] = result
        self.recycled.commit_decode(plan, keys, positions, scores, full_rows.tolist(),
                                    budgets.cpu())

    def _budgets(self, seq_lens: torch.Tensor) -> torch.Tensor:
        if isinstance(self.budget, float):
            return (seq_lens.double() * self.budget).floor().long().clamp(min=1)
        return torch.full_like(seq_lens, self.budget, dtype=torch.long)

    def _attend_as_decode(self, query, seq_lens, block_table, kv_cache, gather=True):
        """Attention of query [N, Hq, D], row i at context seq_lens[i], as decode steps.

        gather=True (real decode): each row reads only its selected tokens.
        gather=False (evaluation mode, rows of one request): the request's context is
        read once and each row attends through its selection mask.
        """
        seq_lens = seq_lens.long()
        budgets = self._budgets(seq_lens)
        dense = budgets >= seq_lens
        if self.policy is None:
            dense = torch.ones_like(dense)
        elif dense.any() and not _dense_logged:
            _dense_logged.add(True)
            logger.info("vllm_sparse: a context within its budget (%s tokens or fewer) is "
                        "attended densely (logged once)", self.budget)
        selection = None
        if not dense.all():
            queries = DecodeQueries(query, seq_lens, block_table, budgets)
            selection = self.policy.select(queries, kv_cache)
        block_size = kv_cache.shape[2]
        if gather:
            pages, sinks, window = _with_dense_rows(selection, dense, seq_lens, block_size,
                                                    self.num_kv_heads)
            out, attended = self.mechanism.decode(query, kv_cache, block_table, seq_lens, pages,
                                                  sinks, window, self.scale)
            self._count(attended, seq_lens, int(dense.sum()))
            return out
        length = int(seq_lens.max())
        positions = torch.arange(length, device=query.device)
        valid = (positions < seq_lens[:, None, None]).expand(-1, self.num_kv_heads, -1)
        if selection is not None:
            sparse_mask = reference.selection_mask(
                selection.pages, seq_lens, selection.num_sink_tokens,
                selection.local_window, block_size, length)
            valid = torch.where(dense[:, None, None], valid, sparse_mask)
        key, value = reference.gather_kv(kv_cache, block_table[:1],
                                         positions.expand(1, self.num_kv_heads, -1))
        self._count(valid.sum(-1), seq_lens, int(dense.sum()))
        return reference.masked_attention(query, key, value, valid, self.scale)

    def _count(self, attended: torch.Tensor, seq_lens: torch.Tensor, num_dense: int) -> None:
        """Counters of one batch of decode-like queries: attended [N, Hkv] tokens each."""
        stats = self.stats
        stats.queries += attended.shape[0] * attended.shape[1]
        stats.attended_tokens += int(attended.sum())
        stats.context_tokens += int(seq_lens.sum()) * attended.shape[1]
        stats.dense_queries += num_dense


_dense_logged: set = set()
_no_identity_logged: set = set()


def _with_dense_rows(selection, dense, seq_lens, block_size, num_kv_heads):
    """One page-mode selection for all rows: rows flagged `dense` take every page."""
    num_rows = seq_lens.shape[0]
    device = seq_lens.device
    all_pages = int(-(-seq_lens[dense].max() // block_size)) if dense.any() else 0
    width = max(all_pages, selection.pages.shape[-1] if selection is not None else 0)
    pages = torch.full((num_rows, num_kv_heads, width), -1, dtype=torch.long, device=device)
    sinks = torch.zeros(num_rows, dtype=torch.long, device=device)
    window = torch.zeros(num_rows, dtype=torch.long, device=device)
    if selection is not None:
        pages[:, :, : selection.pages.shape[-1]] = selection.pages
        sinks, window = selection.num_sink_tokens.clone(), selection.local_window.clone()
    if all_pages:
        pages[dense] = -1
        pages[dense, :, :all_pages] = torch.arange(all_pages, device=device)
        sinks[dense], window[dense] = 0, 0
    return pages, sinks, window


class SparseAttentionBackend(AttentionBackend):
    """Capabilities shared by every method's backend."""

    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]
    method: ClassVar[str | None] = None

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return SUPPORTED_HEAD_SIZES

    @staticmethod
    def get_builder_cls():
        return SparseMetadataBuilder

    @classmethod
    def validate_configuration(cls, head_size, dtype, kv_cache_dtype, block_size, **kwargs):
        """vLLM's checks, with the bad value and the allowed ones named."""
        reasons = super().validate_configuration(head_size=head_size, dtype=dtype,
                                                 kv_cache_dtype=kv_cache_dtype,
                                                 block_size=block_size, **kwargs)
        detail = {
            "head_size not supported": f"head_size={head_size} not supported "
                                       f"(supported: {SUPPORTED_HEAD_SIZES})",
            "dtype not supported": f"dtype={dtype} not supported (supported: "
                                   f"{[str(d) for d in cls.supported_dtypes]})",
            "kv_cache_dtype not supported": f"kv_cache_dtype={kv_cache_dtype!r} not supported "
                                            f"(supported: {cls.supported_kv_cache_dtypes})",
            "block_size not supported": f"block_size={block_size} not supported "
                                        "(supported: multiples of 16)",
        }
        return [detail.get(r, r) for r in reasons]


def _backend(name: str, cls_prefix: str, method: str | None):
    """A backend class and its impl for one registered name (one per method, plus CUSTOM)."""
    impl = type(f"{cls_prefix}Impl", (SparseAttentionImpl,), {"method": method,
                                                              "__module__": __name__})
    backend = type(f"{cls_prefix}Backend", (SparseAttentionBackend,), {
        "__module__": __name__,
        "method": method,
        "get_name": staticmethod(lambda: name),
        "get_impl_cls": staticmethod(lambda: impl),
        "__doc__": f"`--attention-backend {name.lower()}`"
                   + (f": method {method}." if method else ": the method named in the config."),
    })
    return backend, impl


RadarBackend, RadarImpl = _backend("RADAR", "Radar", "radar")
RecycledBackend, RecycledImpl = _backend("RECYCLED", "Recycled", "recycled")
CustomBackend, CustomImpl = _backend("CUSTOM", "Custom", None)


def __getattr__(name: str):
    """`NatsBackend`/`NatsImpl` and `SparseKBackend`/`SparseKImpl` live in
    `vllm_sparse.nats.backend` and `vllm_sparse.sparsek.backend` (imported lazily: they build
    on this module); the plugin registers them under this module's path."""
    if name in ("NatsBackend", "NatsImpl"):
        from vllm_sparse.nats import backend

        return getattr(backend, name)
    if name in ("SparseKBackend", "SparseKImpl"):
        from vllm_sparse.sparsek import backend

        return getattr(backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
