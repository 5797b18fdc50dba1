# SPDX-License-Identifier: Apache-2.0
"""Recycled Attention's policy without vLLM: the batched decode path (plan + commit), the
prefill replay (`emulate`) and the paper's literal partial cache must attend the same
tokens at every position, for both schedules, and re-entry after a recompute must
continue from the right state."""

import pytest
import torch
import torch.nn.functional as F

from vllm_sparse import reference
from vllm_sparse.config import RecycledConfig
from vllm_sparse.policies.recycled import REENTRY_WINDOW, RecycledPolicy

HKV, GROUP, D = 2, 3, 16
SCALE = D ** -0.5
CONFIGS = {
    "fixed": RecycledConfig(schedule="fixed", stride=4),
    "dynamic": RecycledConfig(schedule="dynamic", check_every=2, similarity_threshold=0.6),
}


def _inputs(length: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(length, HKV * GROUP, D, generator=gen)
    key = torch.randn(1, HKV, length, D, generator=gen)
    return query, key


def _scores(query, key, positions):
    at = torch.tensor(positions)
    valid = (torch.arange(key.shape[2]) <= at[:, None, None]).expand(-1, HKV, -1)
    return reference.group_max_probs(query[at], key, valid, SCALE)


def _decode_sets(policy, query, key, prompt, length, budget):
    """Positions >= prompt through plan_decode/commit_decode, one step at a time."""
    start, masks, _ = policy.emulate("r", 0, prompt, prompt, query[:prompt],
                                     lambda ev: _scores(query, key, ev),
                                     lambda n: torch.full_like(n, budget))
    assert list(masks) == []
    sets = []
    for p in range(prompt, length):
        budgets = torch.tensor([budget])
        plan = policy.plan_decode(["r"], [p], query[p:p + 1], budgets)
        full = plan.full[0]
        rows = [0] if full.any() else []
        scores = _scores(query, key, [p])[:, :, : p + 1] if rows else None
        sets.append([set(range(p + 1)) if full[h] else
                     {t for t in plan.tokens[0, h].tolist() if t >= 0} for h in range(HKV)])
        policy.commit_decode(plan, ["r"], [p], scores, rows, budgets)
    return sets


def _emulated_sets(policy, query, key, first, length, sparse_from, budget):
    start, masks, _ = policy.emulate("r", first, length, sparse_from, query[first:length],
                                     lambda ev: _scores(query, key[:, :, :length], ev),
                                     lambda n: torch.full_like(n, budget))
    sets = []
    for lo, hi, valid in masks:
        for row in valid:
            sets.append([set(torch.nonzero(row[h]).flatten().tolist()) for h in range(HKV)])
    return start, sets


def _paper_sets(config, query, key, prompt, length, budget):
    """RefreshKV's Algorithm 1 with a literal list per KV head (ascending score)."""
    def refill(p, h):
        probs = _scores(query, key, [p])[0, h, : p + 1]
        w = config.pool_width
        pooled = F.max_pool1d(probs[None, None], w, 1, w // 2)[0, 0]
        best = torch.sort(pooled, descending=True, stable=True).indices[:budget]
        return best.tolist()[::-1]

    def unit(p, h):
        return F.normalize(query[p].view(HKV, GROUP, D)[h].mean(0), dim=0)

    cache = [refill(prompt - 1, h) for h in range(HKV)]
    ref = [unit(prompt - 1, h) for h in range(HKV)]
    sets = []
    for p in range(prompt, length):
        step, row = p - (prompt - 1), []
        for h in range(HKV):
            if config.schedule == "fixed":
                full = step % config.stride == 0
            else:
                full = step % config.check_every == 0 and float(unit(p, h) @ ref[h]) < \
                    config.similarity_threshold
            if full:
                cache[h], ref[h] = refill(p, h), unit(p, h)
                row.append(set(range(p + 1)))
            else:
                cache[h].append(p)
                if len(cache[h]) > budget:
                    cache[h].pop(0)
                row.append(set(cache[h]))
        sets.append(row)
    return sets


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("budget", [12, 40])
def test_decode_replay_and_paper_agree(name, budget):
    config, prompt, length = CONFIGS[name], 48, 120
    query, key = _inputs(length)
    decoded = _decode_sets(RecycledPolicy(config, HKV), query, key, prompt, length, budget)
    start, replayed = _emulated_sets(RecycledPolicy(config, HKV), query, key, 0, length,
                                     prompt, budget)
    paper = _paper_sets(config, query, key, prompt, length, budget)
    assert start == prompt
    assert decoded == paper
    assert replayed == paper
    assert any(len(s) < p + prompt + 1 for p, row in enumerate(paper) for s in row)
    sizes = {len(s) for p, row in enumerate(paper) for s in row if len(s) < p + prompt + 1}
    assert sizes == {budget}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reentry_after_recompute_continues_the_same_schedule(name):
    """Decode to 100, then recompute positions 80.. (a preempted request whose blocks up
    to 80 stayed cached): the replay must attend exactly as the first run did."""
    config, prompt, length, budget = CONFIGS[name], 32, 100, 16
    query, key = _inputs(length, seed=1)
    policy = RecycledPolicy(config, HKV)
    first_run = _decode_sets(policy, query, key, prompt, length, budget)
    _, replayed = _emulated_sets(policy, query, key, 80, length, prompt, budget)
    assert replayed == first_run[80 - prompt:]


def test_reentry_beyond_the_window_is_a_full_step():
    config, prompt, budget = CONFIGS["fixed"], 8, 4
    length = prompt + REENTRY_WINDOW + 40
    query, key = _inputs(length, seed=2)
    policy = RecycledPolicy(config, HKV)
    _decode_sets(policy, query, key, prompt, length, budget)
    _, replayed = _emulated_sets(policy, query, key, prompt + 2, length, prompt, budget)
    assert replayed[0] == [set(range(prompt + 3))] * HKV          # lost: a full step


def test_forget_drops_finished_requests():
    policy = RecycledPolicy(CONFIGS["fixed"], HKV)
    query, key = _inputs(20)
    _decode_sets(policy, query, key, 10, 12, 4)
    assert "r" in policy.histories
    policy.forget(frozenset({"other"}))
    assert policy.histories == {}
