# SPDX-License-Identifier: Apache-2.0
"""SparseK decode for one layer: each request's kept tokens, compacted into k slots.

Decisions and per-request state only; attending is the backend's job
(`vllm_sparse.sparsek.backend`). The rule is `scorer.attention_rule` (the contract with
training): the query at position i attends the window i - W < j <= i with weight 1, and,
among the c_i = max(0, i - W + 1) older tokens (candidates), all of them with weight 1 when
c_i <= k, else the top-k by score u in the total order (u descending, position ascending)
with weight p_j = clip(u_j - tau_i, 0, 1), tau_i = SPARSEK's threshold over every candidate.

Compaction (what makes memory constant). The first k positions of a request's context are
its *slots*. Once decoding starts, slot s of KV head h holds the K/V of one kept token of
that head (`slot_pos[h, s]` says which), so a decode query reads positions [0, min(k, c_i))
and its window, nothing else, and every page between the slots and the window is dead for
all heads: the backend reports it to the eviction channel and vLLM frees it. Incrementally,
at query i the token j = i - W leaves the window and becomes a candidate: while c_i <= k it
is its own slot (j < k); after that it replaces the worst kept token of a head (lowest u,
the youngest on ties) when its score is strictly greater, by copying its K/V into that
slot; a replaced token never returns (the k-th best candidate only improves). Prefill (a
multi-token step) happens before compaction, on the tokens at their own positions.

tau only ever grows as candidates join, and so does z_(k+1) (the (k+1)-th best candidate
score), and tau >= z_(k+1) - 1: a candidate with u <= z_(k+1) - 1 has p = 0 for good.
`live` keeps, descending, only the scores above that line (at least k + 1) to solve tau
exactly (`kernels/cpu_sparsek_tau.py`). Each decode step's bookkeeping (slot replacement,
list, tau) is `admit_torch`, or its Numba twin `kernels/cpu_sparsek_admit.py` with the
Numba mechanism.
"""

from dataclasses import dataclass

import torch

from vllm_sparse import reference
from vllm_sparse.sparsek.scorer import order_ranks, scores


@dataclass
class RequestState:
    """One request's state in one layer (this rank's Hkv KV heads).

    seq_len: context after the request's last step. compacted: slots in use (decode began).
    num_candidates: c of the last query. slot_pos [Hkv, k] int64 (-1: empty),
    slot_u [Hkv, k] fp32 (-inf: empty). live [Hkv, cap] float64, descending, -inf after
    live_len [Hkv] int64: the candidate scores above z_(k+1) - 1. tau [Hkv] fp32 (-inf
    while c <= k).
    """

    seq_len: int
    compacted: bool = False
    num_candidates: int = 0
    slot_pos: torch.Tensor | None = None
    slot_u: torch.Tensor | None = None
    live: torch.Tensor | None = None
    live_len: torch.Tensor | None = None
    tau: torch.Tensor | None = None


class SparseKPolicy:
    """Kept tokens and value weights for one layer.

    Parameters
    ----------
    weight : [Hkv, 2D], bias : [Hkv], slope : [Hkv]: this layer's scorer for this rank's heads.
    k : kept candidates per KV head (>= 1). window : always-attended recent tokens (W).
    kernels : "numba" (a decode step's bookkeeping in `cpu_sparsek_admit`, CPU tensors) or
    "torch" (its reference).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, slope: torch.Tensor, k: int,
                 window: int, kernels: str = "torch"):
        if kernels not in ("numba", "torch"):
            raise ValueError(f"SparseKPolicy: kernels={kernels!r}; allowed: numba, torch")
        self.weight, self.bias, self.slope = weight, bias, slope
        self.k, self.window = k, window
        self._admit_step = admit_torch
        if kernels == "numba":                           # Numba: the CPU extra only
            from vllm_sparse.kernels.cpu_sparsek_admit import cpu_sparsek_admit

            self._admit_step = cpu_sparsek_admit
        self.requests: dict = {}

    @property
    def num_kv_heads(self) -> int:
        return self.weight.shape[0]

    def scores(self, key: torch.Tensor, value: torch.Tensor, first: int) -> torch.Tensor:
        """key, value [Hkv, n, D] of positions first..first+n-1 -> u [Hkv, n] fp32."""
        positions = torch.arange(first, first + key.shape[1], device=key.device)
        return scores(key, value, self.weight, self.bias, self.slope, positions).float()

    # ------------------------------------------------------------ state
    def forget(self, live) -> None:
        """Drop the state of requests the runner no longer holds (None: keep all)."""
        if live is not None:
            for key in [k for k in self.requests if k not in live]:
                del self.requests[key]

    def begin_prefill(self, key, first: int, seq_len: int) -> None:
        """A multi-token step of positions [first, seq_len): tokens must be at their own
        positions (not compacted). Position 0 starts the request (or its recompute) over."""
        state = self.requests.get(key)
        if first == 0:
            self.requests[key] = RequestState(seq_len)
            return
        if state is None or state.seq_len != first or state.compacted:
            raise RuntimeError(
                f"vllm_sparse: sparsek got a {seq_len - first}-token step of request "
                f"{key[0]!r} at position {first} after "
                + ("its decode began (multi-token decode steps, e.g. speculative decoding, "
                   "are not supported)" if state is not None and state.compacted else
                   "losing its state"))
        state.seq_len = seq_len

    def decode(self, key, position: int, kv_cache: torch.Tensor,
               block_table_row: torch.Tensor) -> tuple[int, torch.Tensor]:
        """The query at `position` (its K/V already written): update the kept set (compacting
        at the request's first decode step), -> (m, weights [Hkv, m]): the query attends
        slots 0..m-1 with these weights, and its window with weight 1."""
        state = self.requests.get(key)
        if state is not None and state.seq_len != position:
            raise RuntimeError(
                f"vllm_sparse: sparsek lost the kept tokens of request {key[0]!r} (decode at "
                f"position {position}, its last step ended at {state.seq_len})")
        if state is None or not state.compacted:
            state = self._compact(key, position, kv_cache, block_table_row)
        else:
            self._admit(state, position - self.window, kv_cache, block_table_row)
        state.seq_len = position + 1
        m = min(self.k, state.num_candidates)
        if state.num_candidates <= self.k:
            return m, torch.ones(self.num_kv_heads, m, device=kv_cache.device)
        return m, (state.slot_u - state.tau[:, None]).clamp(0, 1)

    def _compact(self, key, position: int, kv_cache, block_table_row) -> RequestState:
        """First decode step at `position`: the candidates of this query are at their own
        positions; keep the top-k of them in the slots."""
        k, device = self.k, kv_cache.device
        c = max(0, position - self.window + 1)
        state = RequestState(position, compacted=True, num_candidates=c)
        state.slot_pos = torch.full((self.num_kv_heads, k), -1, dtype=torch.long, device=device)
        state.slot_u = torch.full((self.num_kv_heads, k), float("-inf"), device=device)
        state.tau = torch.full((self.num_kv_heads,), float("-inf"), device=device)
        u = torch.zeros(self.num_kv_heads, 0, device=device)
        if c:
            positions = torch.arange(c, device=device).expand(self.num_kv_heads, -1)
            key_, value = reference.gather_kv(kv_cache, block_table_row[None], positions[None])
            u = self.scores(key_[0], value[0], 0)                                     # [H, c]
            if c <= k:
                state.slot_pos[:, :c], state.slot_u[:, :c] = positions, u
            else:
                kept = (order_ranks(u) < k).nonzero()[:, 1].view(self.num_kv_heads, k)  # sorted
                heads = torch.arange(self.num_kv_heads, device=device)[:, None].expand_as(kept)
                slots = torch.arange(k, device=device).expand_as(kept)
                reference.move_tokens(kv_cache, block_table_row, heads.flatten(), kept.flatten(),
                                      slots.flatten())
                state.slot_pos, state.slot_u = kept.contiguous(), u.gather(1, kept)
        self._start_live(state, u)
        if key is not None:
            self.requests[key] = state
        return state

    def _start_live(self, state: RequestState, u: torch.Tensor) -> None:
        """The near-tau list of the candidate scores u [Hkv, c], and tau when c > k."""
        from vllm_sparse.kernels.sparsek_topk import sparsek

        k, heads = self.k, self.num_kv_heads
        live = u.double().sort(dim=1, descending=True).values
        length = torch.full((heads,), live.shape[1], dtype=torch.long, device=live.device)
        if live.shape[1] > k + 1:
            length = torch.minimum(length, (live > live[:, k:k + 1] - 1).sum(dim=1))
        capacity = int(length.max()) + k + 64                   # room for steps before growing
        state.live = torch.full((heads, capacity), float("-inf"), dtype=torch.float64,
                                device=live.device)
        width = min(live.shape[1], capacity)
        state.live[:, :width] = live[:, :width].masked_fill(
            torch.arange(width, device=live.device) >= length[:, None], float("-inf"))
        state.live_len = length
        if live.shape[1] > k:
            _, tau = sparsek(state.live, k, length, kernels="torch", return_tau=True)
            state.tau = tau.float()

    def _admit(self, state: RequestState, j: int, kv_cache, block_table_row) -> None:
        """Token j leaves the window and becomes the newest candidate."""
        if j < 0:
            return
        kv = kv_cache
        position = torch.tensor([j], device=kv.device).expand(self.num_kv_heads, 1)
        key_, value = reference.gather_kv(kv, block_table_row[None], position[None])
        u = self.scores(key_[0], value[0], j)[:, 0]                                   # [H]
        state.num_candidates = j + 1
        if int(state.live_len.max()) >= state.live.shape[1]:                     # grow the list
            state.live = torch.cat([state.live, torch.full_like(state.live, float("-inf"))], 1)
        moved, tau = self._admit_step(state.live, state.live_len, state.slot_pos, state.slot_u,
                                      u, j, self.k)
        state.tau = tau.float()
        heads = (moved >= 0).nonzero()[:, 0]
        if heads.numel():
            reference.move_tokens(kv, block_table_row, heads, torch.full_like(heads, j),
                                  moved[heads])

    # ------------------------------------------------------------ eviction
    def evictable_pages(self, key, block_size: int, num_pages: int,
                        device: torch.device) -> torch.Tensor:
        """[num_pages] bool: pages no later query of this request reads, after its last step:
        once compacted, pages past the slots whose tokens all left the window and were
        admitted (positions < seq_len - W)."""
        out = torch.zeros(num_pages, dtype=torch.bool, device=device)
        state = self.requests.get(key)
        if state is None or not state.compacted:
            return out
        first = torch.arange(num_pages, device=device) * block_size
        return (first >= self.k) & (first + block_size <= state.seq_len - self.window)


def admit_torch(live: torch.Tensor, live_len: torch.Tensor, slot_pos: torch.Tensor,
                slot_u: torch.Tensor, u: torch.Tensor, j: int, k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step's bookkeeping in torch (any device; `kernels/cpu_sparsek_admit.py`
    has the shapes and the in-place state): token j joins the candidates -> (moved [Hkv]
    int64, tau [Hkv] float64). The worst kept token by a min and a tie-break, the near-tau
    list by a sort, tau by `sparsek_topk`'s exact sort-based SPARSEK over the list."""
    from vllm_sparse.kernels.sparsek_topk import sparsek

    heads = torch.arange(u.shape[0], device=u.device)
    moved = torch.full_like(live_len, -1)
    if j < k:
        slot_pos[:, j], slot_u[:, j] = j, u
    else:
        worst_u = slot_u.min(dim=1).values
        tied = slot_u == worst_u[:, None]
        worst = torch.where(tied, slot_pos, -1).argmax(dim=1)
        better = u > worst_u
        moved = torch.where(better, worst, moved)
        slot_pos[heads[better], worst[better]] = j
        slot_u[heads[better], worst[better]] = u[better]
    # the list: insert, sort, keep what is above z_(k+1) - 1 (at least k + 1)
    merged = torch.cat([live, u.double()[:, None]], dim=1)
    merged[heads, live_len] = u.double()
    merged[:, -1] = float("-inf")
    merged = merged.sort(dim=1, descending=True).values[:, :live.shape[1]]
    length = live_len + 1
    if merged.shape[1] > k:
        cut = torch.where(length > k + 1, merged[:, k] - 1, float("-inf"))
        length = torch.minimum(length, (merged > cut[:, None]).sum(dim=1))
    live.copy_(merged.masked_fill(torch.arange(live.shape[1], device=u.device) >= length[:, None],
                                  float("-inf")))
    live_len.copy_(length)
    if j < k:
        return moved, torch.full((u.shape[0],), float("-inf"), dtype=torch.float64,
                                 device=u.device)
    _, tau = sparsek(live, k, live_len, kernels="torch", return_tau=True)
    return moved, tau
