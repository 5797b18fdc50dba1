# SPDX-License-Identifier: Apache-2.0
"""Recycled Attention / RefreshKV: which tokens each decode step attends, and when it
refreshes them (Xu, Goyal, Choi; arXiv 2411.05787 v1 "Recycled Attention", ACL 2025
"RefreshKV"). Hyperparameters: `vllm_sparse.config.RecycledConfig`.

Per request, layer and KV head h, after a *full step* at position f_h (dense attention
over the whole context):

* ranking: the attention of that step, max over the query heads of h, max-pooled over
  positions (width `pool_width`), orders the positions t <= f_h best first; the best
  K(f_h) are kept (`order`);
* partial step at position p (g = p - f_h tokens since the full step, the current one
  included; K = K(p) the budget at p): attend the best max(0, K - g) ranked tokens and
  the generated tokens max(f_h + 1, p - K + 1) .. p. That is the paper's partial cache
  of K tokens in which each new token pushes out the lowest-ranked one.

The first full step is the last prompt token (the end of a dense prefill); a request
whose state was lost does a full step. Schedules (counted from that first full step,
the *anchor*): fixed, every `stride` steps; dynamic, every `check_every` steps each KV
head whose unit mean query has cosine below `similarity_threshold` with the one of its
last full step. State changes only at full steps, so a request keeps a short history of
states to re-enter at an earlier position (a recompute after preemption starts at the
last cached block). Where the paper decides per layer from all query heads, decisions
here are per KV head: a tensor-parallel rank holds whole KV heads and decides alone.
"""

import logging
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from vllm_sparse.config import RecycledConfig

logger = logging.getLogger("vllm.vllm_sparse")
_UNRANKED = torch.iinfo(torch.int32).max
REENTRY_WINDOW = 128
"""Positions back from where a request stopped at which it can re-enter exactly (a
recompute after preemption starts at its last cached block, or at the prompt when no
block was kept; earlier states are dropped to bound memory)."""


@dataclass(frozen=True)
class RecycledState:
    """One layer's state for one request, valid from position `event` until the next refresh.

    anchor: position of the request's first full step; full_pos: [Hkv] long, each KV
    head's last full step; order: per KV head, [K_h] int32 positions ranked at that step,
    best first (heads not refreshed share the tensor of the previous state); ref:
    [Hkv, D] fp32, unit mean query of each KV head at that step.
    """

    event: int
    anchor: int
    full_pos: torch.Tensor
    order: tuple[torch.Tensor, ...]
    ref: torch.Tensor

    def order_matrix(self, width: int | None = None) -> torch.Tensor:
        """[Hkv, width] long, -1 padded."""
        width = max(len(o) for o in self.order) if width is None else width
        out = torch.full((len(self.order), width), -1, dtype=torch.long)
        for h, o in enumerate(self.order):
            out[h, : len(o)] = o
        return out


class History:
    """States of one request in one layer, oldest first, and the last position seen."""

    def __init__(self):
        self.states: deque[RecycledState] = deque()
        self.pos = -1

    def advance(self, position: int) -> None:
        """`position` was processed; drop states no position in the re-entry window needs."""
        self.pos = position
        while len(self.states) > 1 and self.states[1].event <= position - REENTRY_WINDOW:
            self.states.popleft()

    def truncate(self, position: int) -> None:
        """Forget everything from `position` on (it is being computed again)."""
        while self.states and self.states[-1].event >= position:
            self.states.pop()
        self.pos = min(self.pos, position - 1)

    def at(self, position: int) -> RecycledState | None:
        """The state that governed `position`, if it was processed and is still held."""
        if position > self.pos:
            return None
        for state in reversed(self.states):
            if state.event <= position:
                return state
        return None


@dataclass
class DecodePlan:
    """What one batch of decode rows does: full [N, Hkv] bool (attend everything and
    refresh), tokens [N, Hkv, W] long, -1 padded (the partial steps' tokens)."""

    full: torch.Tensor
    tokens: torch.Tensor
    states: list[RecycledState | None]
    unit_query: torch.Tensor


def unit_group_mean(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[N, Hq, D] -> [N, Hkv, D] fp32: mean query of each KV head's group, unit length."""
    n, hq, d = query.shape
    mean = query.float().view(n, num_kv_heads, hq // num_kv_heads, d).mean(dim=2)
    return F.normalize(mean, dim=-1)


def rank_tokens(scores: torch.Tensor, seq_len: int, keep: int, pool_width: int) -> torch.Tensor:
    """Positions [Hkv, min(keep, seq_len)] best first, from scores [Hkv, L] (L >= seq_len)."""
    scores = scores[:, :seq_len].float()
    if pool_width > 1:
        scores = F.max_pool1d(scores[:, None], pool_width, stride=1, padding=pool_width // 2)[:, 0]
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[:, : min(keep, seq_len)]


class RecycledPolicy:
    """Recycled Attention for one layer: per-request histories keyed by request."""

    def __init__(self, config: RecycledConfig, num_kv_heads: int):
        self.config = config
        self.num_kv_heads = num_kv_heads
        self.histories: dict = {}

    # ------------------------------------------------------------ bookkeeping
    def forget(self, live) -> None:
        """Drop the state of requests the runner no longer holds."""
        if live is not None:
            for key in [k for k in self.histories if k not in live]:
                del self.histories[key]

    def _history(self, key) -> History:
        if key not in self.histories:
            self.histories[key] = History()
        return self.histories[key]

    def _due(self, state: RecycledState, position: int, unit_query: torch.Tensor) -> torch.Tensor:
        """[Hkv] bool: which KV heads refresh at `position` under the schedule."""
        steps = position - state.anchor
        cfg = self.config
        if cfg.schedule == "fixed":
            return torch.full((self.num_kv_heads,), steps % cfg.stride == 0)
        if steps % cfg.check_every:
            return torch.zeros(self.num_kv_heads, dtype=torch.bool)
        cosine = (unit_query.cpu() * state.ref).sum(-1)
        return cosine < cfg.similarity_threshold

    def _refreshed(self, old: RecycledState | None, position: int, heads: torch.Tensor,
                   orders: torch.Tensor, unit_query: torch.Tensor) -> RecycledState:
        """The state after a full step of `heads` [Hkv] bool at `position`."""
        hkv = self.num_kv_heads
        fresh = orders.cpu().to(torch.int32)
        if old is None:
            return RecycledState(position, position, torch.full((hkv,), position),
                                 tuple(fresh[h].clone() for h in range(hkv)),
                                 unit_query.cpu().clone())
        order = tuple(fresh[h].clone() if heads[h] else old.order[h] for h in range(hkv))
        full_pos = old.full_pos.clone()
        full_pos[heads] = position
        ref = old.ref.clone()
        ref[heads] = unit_query.cpu()[heads]
        return RecycledState(position, old.anchor, full_pos, order, ref)

    # ------------------------------------------------------------ decode steps
    def plan_decode(self, keys: list, positions: list[int], query: torch.Tensor,
                    budgets: torch.Tensor, prompt_ends: list[bool] | None = None) -> DecodePlan:
        """Rows of one decode batch: query [N, Hq, D] at `positions`, budgets [N] tokens.
        prompt_ends [N]: the row is its prompt's last token (scheduled alone by chunked
        prefill), whose full step starts the request's state: no state is expected there."""
        n, hkv = len(keys), self.num_kv_heads
        unit = unit_group_mean(query, hkv)
        states = [self._history(k).at(p - 1) if k is not None else None
                  for k, p in zip(keys, positions)]
        full = torch.ones(n, hkv, dtype=torch.bool)
        for i, state in enumerate(states):
            if state is not None:
                full[i] = self._due(state, positions[i], unit[i])
            elif keys[i] is not None and not (prompt_ends and prompt_ends[i]):
                _log_lost(positions[i])
        tokens = self._partial_tokens(states, positions, budgets.cpu(), full)
        device = query.device
        return DecodePlan(full.to(device), tokens.to(device), states, unit)

    def _partial_tokens(self, states, positions, budgets, full) -> torch.Tensor:
        hkv = self.num_kv_heads
        rows = [i for i, s in enumerate(states) if s is not None and not bool(full[i].all())]
        if not rows:
            return torch.full((len(states), hkv, 0), -1, dtype=torch.long)
        width = max(len(o) for i in rows for o in states[i].order)
        order = torch.full((len(states), hkv, width), -1, dtype=torch.long)
        f = torch.zeros(len(states), hkv, dtype=torch.long)
        for i in rows:
            order[i] = states[i].order_matrix(width)
            f[i] = states[i].full_pos
        p = torch.tensor(positions, dtype=torch.long)[:, None]
        k = budgets.long()[:, None]
        since = p - f                                              # g, current token included
        kept = (k - since).clamp(min=0)                            # recycled tokens still held
        recycled = order.where(torch.arange(width) < kept[..., None], -1)
        num_new = torch.minimum(since, k)
        span = int(num_new[rows].max())
        offsets = torch.arange(span)
        generated = (p[..., None] - offsets).where(offsets < num_new[..., None], -1)
        tokens = torch.cat([recycled, generated], dim=-1)
        tokens[full] = -1
        return tokens

    def commit_decode(self, plan: DecodePlan, keys: list, positions: list[int],
                      scores: torch.Tensor | None, full_rows: list[int],
                      budgets: torch.Tensor) -> None:
        """Record the step: refresh the full heads from scores [len(full_rows), Hkv, L]."""
        scored = {row: j for j, row in enumerate(full_rows)}
        full = plan.full.cpu()
        for i, (key, position) in enumerate(zip(keys, positions)):
            if key is None:
                continue
            history = self._history(key)
            if i in scored:
                orders = rank_tokens(scores[scored[i]], position + 1, int(budgets[i]),
                                     self.config.pool_width)
                state = self._refreshed(plan.states[i], position, full[i], orders,
                                        plan.unit_query[i])
                _append(history, state)
            history.advance(position)

    # ------------------------------------------------------------ prefill chunks
    def emulate(self, key, first: int, end: int, sparse_from: int, query: torch.Tensor,
                scores_fn: Callable[[list[int]], torch.Tensor],
                budget_fn: Callable[[torch.Tensor], torch.Tensor]):
        """One request's prefill chunk, positions [first, end), queries [end-first, Hq, D].

        Positions < sparse_from were prefilled densely; the one at sparse_from - 1, if in
        the chunk, is the first full step; positions >= sparse_from attend as the decode
        steps of this policy would. scores_fn(positions) gives the dense attention
        scores [E, Hkv, end] (max over each group, 0 beyond each position) of the
        chunk's queries at those positions; budget_fn(context lengths) the budgets.
        Returns (start, masks): masks yields (lo, hi, valid [hi-lo, Hkv, end]) for
        positions start .. end-1 (none when start >= end), and the number of full
        (position, KV head) steps.
        """
        hkv = self.num_kv_heads
        history = self._history(key) if key is not None else History()
        start = max(first, sparse_from)
        if sparse_from - 1 >= end:               # the chunk ends before the sparse part
            return end, iter(()), 0
        history.truncate(first)
        unit = unit_group_mean(query, hkv).cpu()
        full = torch.zeros(end - first, hkv, dtype=torch.bool)
        state0 = None
        if first <= sparse_from - 1:
            anchor = sparse_from - 1
            full[anchor - first] = True
        else:
            state0 = history.at(first - 1)
            anchor = state0.anchor if state0 is not None else first
            if state0 is None:
                _log_lost(first)
                full[0] = True
        self._scan(full, first, anchor, state0, unit)
        events = [first + i for i in torch.nonzero(full.any(-1)).flatten().tolist()]
        scores = scores_fn(events).cpu() if events else None
        ranks = []
        if state0 is not None:
            ranks.append(_ranks_from_order(state0.order_matrix(), end))
        gov = torch.full((end - first, hkv), -1, dtype=torch.long)
        fpos = torch.full((end - first, hkv), -1, dtype=torch.long)
        states = []
        state = state0
        budgets = budget_fn(torch.tensor(events, dtype=torch.long) + 1) if events else None
        for j, e in enumerate(events):
            orders = rank_tokens(scores[j], e + 1, int(budgets[j]), self.config.pool_width)
            heads = full[e - first]
            state = self._refreshed(state, e, heads, orders, unit[e - first])
            states.append(state)
            ranks.append(_ranks_from_order(orders, end))
            gov[e - first, heads] = len(ranks) - 1
            fpos[e - first, heads] = e
        if state0 is not None:
            gov[0] = torch.where(gov[0] >= 0, gov[0], 0)
            fpos[0] = torch.where(fpos[0] >= 0, fpos[0], state0.full_pos)
        gov, fpos = _carry_forward(gov), _carry_forward(fpos)
        for s in states:
            _append(history, s)
        history.advance(end - 1)
        rank_rows = torch.stack(ranks) if ranks else None
        device = query.device
        num_full = int(full[start - first:].sum())

        def masks(chunk: int = 256):
            t = torch.arange(end)
            for lo in range(start, end, chunk):
                hi = min(lo + chunk, end)
                p = torch.arange(lo, hi)[:, None, None]
                g_rows = gov[lo - first: hi - first]
                f = fpos[lo - first: hi - first][..., None]
                k = budget_fn(p + 1)
                since = p - f
                rank = rank_rows[g_rows, torch.arange(hkv)]                  # [n, Hkv, end]
                valid = (rank < (k - since)) | ((t > f) & (t > p - k) & (t <= p))
                is_full = full[lo - first: hi - first][..., None]
                valid = torch.where(is_full, t <= p, valid)
                yield lo, hi, valid.to(device)

        return start, masks(), num_full

    def _scan(self, full, first, anchor, state0, unit) -> None:
        """Fill `full` [Q, Hkv] (positions first..) with the schedule's refreshes."""
        cfg = self.config
        q_len = full.shape[0]
        seeded = torch.nonzero(full.any(-1)).flatten().tolist()
        begin = seeded[0] + 1 if seeded else 0
        if cfg.schedule == "fixed":
            for i in range(begin, q_len):
                if (first + i - anchor) % cfg.stride == 0:
                    full[i] = True
            return
        ref = (state0.ref.numpy().astype(np.float64).copy() if state0 is not None
               else np.zeros((self.num_kv_heads, unit.shape[-1])))
        u = unit.numpy().astype(np.float64)
        if seeded:
            ref[:] = u[seeded[0]]
        for i in range(begin, q_len):
            if (first + i - anchor) % cfg.check_every:
                continue
            due = (u[i] * ref).sum(-1) < cfg.similarity_threshold
            if due.any():
                full[i] = torch.from_numpy(due)
                ref[due] = u[i][due]


_lost_logged: set = set()


def _log_lost(position: int) -> None:
    if not _lost_logged:
        _lost_logged.add(True)
        logger.warning("vllm_sparse: recycled: a request continues at position %d without its "
                       "state (lost, or re-entered more than %d positions back after a "
                       "preemption); it does a full step there (logged once)",
                       position, REENTRY_WINDOW)


def _append(history: History, state: RecycledState) -> None:
    while history.states and history.states[-1].event >= state.event:
        history.states.pop()            # a recompute replaces what it re-enters
    history.states.append(state)


def _ranks_from_order(order: torch.Tensor, length: int) -> torch.Tensor:
    """[Hkv, K] positions best first -> [Hkv, length] int rank (unranked: a huge value)."""
    hkv, k = order.shape
    ranks = torch.full((hkv, length + 1), _UNRANKED, dtype=torch.long)
    idx = order.where(order >= 0, length)
    ranks.scatter_(1, idx, torch.arange(k).expand(hkv, -1).contiguous())
    return ranks[:, :length]


def _carry_forward(values: torch.Tensor) -> torch.Tensor:
    """Replace -1 entries [Q, H] by the last non-negative value above them."""
    idx = torch.where(values >= 0, torch.arange(values.shape[0])[:, None], -1)
    idx = torch.cummax(idx, dim=0).values
    return values.gather(0, idx.clamp(min=0)).where(idx >= 0, -1)
