# SPDX-License-Identifier: Apache-2.0
"""NAtS policy for one layer: each request's chunk types and which tokens are live.

Decisions only; attending is the backend's job (`vllm_sparse.nats.backend`). Rules are
those of `vllm_sparse.nats.gates` (the contract with training): a chunk's type is decided
from its own keys and values once its last token is written, and a token of a complete
chunk stays visible while `gates.visible` says so. Visibility only shrinks as the
position grows, so the tokens a query at position p (or any later one) may attend are
exactly those of chunks `gates.evictable(types, ..., p)` leaves, plus the incomplete last
chunk; after a step that ends with context T, chunks evictable at T are dead for good.

State per request (the runner patch's request key): the types of its complete chunks,
for this rank's KV heads. A step covering positions [first, T) extends them with the
chunks it completes; a step starting at position 0 (a new request, or the recompute of a
preempted one) starts over, so a request that lost its decisions rebuilds them from the
recompute.
"""

import logging

import torch

from vllm_sparse.nats import gates as G

logger = logging.getLogger("vllm.vllm_sparse")


class NatsPolicy:
    """Chunk types and liveness for one layer.

    Parameters
    ----------
    weight : [Hkv, 3, 2D] gate weights of this layer and rank's KV heads.
    bias : [Hkv, 3].
    chunk_size : tokens per type decision (C).
    window : SLIDING lifetime past the chunk's end (W).

    `types[key]` is [Hkv, n] int8: the types of the request's n complete chunks.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, chunk_size: int, window: int):
        self.weight, self.bias = weight, bias
        self.chunk_size, self.window = chunk_size, window
        self.types: dict = {}

    @property
    def num_kv_heads(self) -> int:
        return self.weight.shape[0]

    # ------------------------------------------------------------ state
    def forget(self, live) -> None:
        """Drop the state of requests the runner no longer holds (None: keep all)."""
        if live is not None:
            for key in [k for k in self.types if k not in live]:
                del self.types[key]

    def known(self, key, first: int) -> torch.Tensor | None:
        """Types [Hkv, first // C] of the chunks complete before position `first`, for a
        step of request `key` that starts there; None when they must be computed from the
        cache (no request identity). A step at position 0 starts the request over."""
        n = first // self.chunk_size
        if key is None:
            return None
        if first == 0:
            self.types.pop(key, None)
            return self.types.setdefault(key, self._empty())
        types = self.types.get(key)
        if types is None or types.shape[1] < n:
            raise RuntimeError(
                f"vllm_sparse: nats lost the chunk types of request {key[0]!r} (continues at "
                f"position {first} with {0 if types is None else types.shape[1]} of {n} "
                "chunks typed); its evicted pages cannot be read back")
        return types[:, :n]

    def extend(self, key, before: torch.Tensor, key_states: torch.Tensor,
               value_states: torch.Tensor) -> torch.Tensor:
        """All complete chunks' types after a step: `before` [Hkv, n0] and the chunks the
        step completed, whose keys/values are key_states/value_states [Hkv, m * C, D]."""
        new = self.chunk_types(key_states, value_states, first_chunk=before.shape[1])
        types = torch.cat([before, new], dim=1) if new.shape[1] else before
        if key is not None:
            self.types[key] = types
        return types

    def chunk_types(self, key_states, value_states, first_chunk: int) -> torch.Tensor:
        """[Hkv, m] int8 types of m complete chunks from their keys/values [Hkv, m * C, D]."""
        if key_states.shape[1] == 0:
            return self._empty()
        features = G.chunk_features(key_states, value_states, self.chunk_size)
        logits = G.gate_logits(features, self.weight, self.bias)
        return G.chunk_types(logits, first_chunk=first_chunk)

    def no_chunks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [Hkv, 0, D] (a step that completed no chunk)."""
        empty = self.weight.new_zeros(self.num_kv_heads, 0, self.weight.shape[-1] // 2)
        return empty, empty

    def _empty(self) -> torch.Tensor:
        return torch.zeros(self.num_kv_heads, 0, dtype=torch.int8, device=self.weight.device)

    # ------------------------------------------------------------ liveness
    def live_chunks(self, types: torch.Tensor, position: int) -> torch.Tensor:
        """[Hkv, n] bool: complete chunks some query at `position` or later attends."""
        return ~G.evictable(types, self.chunk_size, self.window, position)

    def live_tokens(self, types: torch.Tensor, position: int, seq_len: int) -> torch.Tensor:
        """Positions [Hkv, L] (ascending, -1 padded) of the tokens among [0, seq_len) that
        some query at `position` or later attends: live complete chunks, then the rest."""
        complete = types.shape[1] * self.chunk_size
        live = torch.cat([
            self.live_chunks(types, position).repeat_interleave(self.chunk_size, dim=1),
            torch.ones(types.shape[0], seq_len - complete, dtype=torch.bool,
                       device=types.device)], dim=1)
        return _pack(live)

    def visible(self, types: torch.Tensor, query_pos: torch.Tensor,
                positions: torch.Tensor, seq_len: int) -> torch.Tensor:
        """[Q, Hkv, L] bool: what queries at `query_pos` [Q] attend among `positions`
        [Hkv, L] (-1 padded), by `gates.visible`."""
        mask = G.visible(types, self.chunk_size, self.window, query_pos, seq_len)  # [H, Q, K]
        index = positions.clamp(min=0)[:, None, :].expand(-1, query_pos.shape[0], -1)
        return (mask.gather(2, index) & (positions >= 0)[:, None, :]).transpose(0, 1)

    def evictable_pages(self, types: torch.Tensor, next_pos: int, block_size: int,
                        num_pages: int) -> torch.Tensor:
        """[num_pages] bool: pages every token of which is dead, for every KV head, to
        queries at `next_pos` and later (never a page with a token of an incomplete chunk)."""
        dead = G.evictable(types, self.chunk_size, self.window, next_pos).all(dim=0)
        dead = dead.repeat_interleave(self.chunk_size)
        full_pages = dead.shape[0] // block_size
        pages = dead[: full_pages * block_size].view(full_pages, block_size).all(dim=1)
        out = torch.zeros(num_pages, dtype=torch.bool, device=types.device)
        out[: min(full_pages, num_pages)] = pages[:num_pages]
        return out


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """mask [H, K] bool -> positions [H, max count] of its True entries, ascending, -1 padded."""
    heads, length = mask.shape
    index = torch.arange(length, device=mask.device).expand(heads, length)
    width = int(mask.sum(dim=1).max()) if heads else 0
    keyed = torch.where(mask, index, length).sort(dim=1).values[:, :width]
    return keyed.where(keyed < length, -1)


def check_block_size(chunk_size: int, block_size: int) -> None:
    """Pages and chunks must nest (a page holds whole chunks or a chunk whole pages)."""
    if chunk_size % block_size and block_size % chunk_size:
        raise ValueError(
            f"vllm_sparse: nats chunk_size={chunk_size} (from the gates file) and KV block size "
            f"{block_size} do not nest; allowed block sizes: divisors of {chunk_size} that are "
            f"multiples of 16, or multiples of {chunk_size} (pass --block-size)")
