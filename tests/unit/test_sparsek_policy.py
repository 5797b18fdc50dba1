# SPDX-License-Identifier: Apache-2.0
"""SparseK's decode policy (`vllm_sparse.sparsek.policy`) on a paged cache, against the
rule applied to the whole original context (`scorer.attention_rule`, itself checked against
a per-query loop in test_sparsek_scorer.py).

At every decode step: the positions the query reads (slots [0, m) and the window) hold, per
KV head, exactly the tokens the rule attends, with the rule's value weights; the slots'
K/V in the cache are those tokens' original K/V (compaction copies).
Pages the policy declares evictable are filled with NaN at once, so a later read of one
would break those equalities. Scores with many exact ties (integer features) exercise the
total order.
"""

import pytest
import torch

from vllm_sparse.sparsek.policy import SparseKPolicy
from vllm_sparse.sparsek.scorer import attention_rule, scores

HEADS, DIM, BLOCK = 2, 4, 4


def _setup(n, ties, seed=0):
    g = torch.Generator().manual_seed(seed)
    if ties:   # integer K/V and weights: integer scores, many equal
        key = torch.randint(-2, 3, (HEADS, n, DIM), generator=g).float()
        value = torch.randint(-2, 3, (HEADS, n, DIM), generator=g).float()
        weight = torch.randint(-1, 2, (HEADS, 2 * DIM), generator=g).float()
        slope = torch.zeros(HEADS)
    else:
        key, value = torch.randn(HEADS, n, DIM, generator=g), torch.randn(HEADS, n, DIM, generator=g)
        weight = torch.randn(HEADS, 2 * DIM, generator=g) * 0.7
        slope = torch.tensor([0.01, -0.02])
    bias = torch.zeros(HEADS)
    pages = -(-n // BLOCK)
    table = torch.randperm(pages + 3, generator=g)[:pages]                # scattered blocks
    cache = torch.full((pages + 3, HEADS, BLOCK, 2 * DIM), float("nan"))
    pos = torch.arange(n)
    cache[table[pos // BLOCK], :, pos % BLOCK] = torch.cat([key, value], -1).transpose(0, 1)
    u = scores(key, value, weight, bias, slope, pos)
    return key, value, (weight, bias, slope), u, cache, table


@pytest.mark.parametrize("kernels", ["torch", "numba"])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k,window,prompt", [(5, 3, 20), (5, 3, 4), (1, 0, 9), (8, 6, 30),
                                              (12, 2, 6)])
def test_decode_equals_rule_on_full_context(k, window, prompt, ties, kernels):
    n = prompt + 40
    key, value, params, u, cache, table = _setup(n, ties)
    policy = SparseKPolicy(*params, k, window, kernels=kernels)
    request = ("r", 0)
    policy.begin_prefill(request, 0, prompt)
    original = torch.cat([key, value], -1)                                      # [H, n, 2D]
    attended_all, weights_all = attention_rule(u, k, window, torch.arange(n), "torch")
    freed = torch.zeros(table.shape[0], dtype=torch.bool)
    for i in range(prompt, n):
        m, slot_weights = policy.decode(request, i, cache, table)
        state = policy.requests[request]
        c = max(0, i - window + 1)
        assert m == min(k, c)
        # what the query reads, per head: slot tokens (their original positions) + the window
        read = torch.zeros(HEADS, n, dtype=torch.bool)
        weights = torch.zeros(HEADS, n)
        for h in range(HEADS):
            held = state.slot_pos[h, :m]
            assert (held >= 0).all() and held.unique().numel() == m
            read[h, held] = True
            weights[h, held] = slot_weights[h]
            # the slot holds that token's K/V (moved there by compaction / admission)
            slot = torch.arange(m)
            assert torch.equal(cache[table[slot // BLOCK], h, slot % BLOCK], original[h, held])
        recent = torch.arange(max(m, i - window + 1), i + 1)
        read[:, recent], weights[:, recent] = True, 1.0
        assert torch.equal(read, attended_all[:, i]), f"position {i}"
        torch.testing.assert_close(weights, weights_all[:, i].float(), atol=1e-5, rtol=0)
        # evictable pages are poisoned at once: a later read of one (a copy into a slot or
        # the window) would put NaN where the original K/V is expected above
        dead = policy.evictable_pages(request, BLOCK, table.shape[0], cache.device)
        cache[table[dead]] = float("nan")
        freed |= dead
    if n - window > k + 2 * BLOCK:
        assert freed.any()


@pytest.mark.parametrize("kernels", ["torch", "numba"])
def test_live_scores_stay_near_k_and_tau_exact(kernels):
    """The list holds exactly the candidate scores above z_(k+1) - 1, descending (a few
    more than k here), and tau equals SPARSEK over every candidate."""
    from vllm_sparse.kernels.sparsek_topk import sparsek

    n, k, window = 200, 6, 4
    key, value, params, u, cache, table = _setup(n, ties=False, seed=3)
    policy = SparseKPolicy(*params, k, window, kernels=kernels)
    policy.begin_prefill(("r", 0), 0, 50)
    for i in range(50, n):
        policy.decode(("r", 0), i, cache, table)
    state = policy.requests[("r", 0)]
    c = n - 1 - window + 1
    _, tau = sparsek(u[:, :c].double(), k, kernels="torch", return_tau=True)
    torch.testing.assert_close(state.tau, tau.float(), atol=1e-6, rtol=0)
    candidates = u[:, :c].double().sort(dim=1, descending=True).values
    for h in range(HEADS):
        want = candidates[h][candidates[h] > candidates[h, k] - 1]
        assert torch.equal(state.live[h, :state.live_len[h]], want)
        assert (state.live[h, state.live_len[h]:] == float("-inf")).all()
    assert int(state.live_len.max()) < c / 4


def test_unknown_kernels_refused():
    params = _setup(8, ties=False)[2]
    with pytest.raises(ValueError, match="kernels='triton'; allowed: numba, torch"):
        SparseKPolicy(*params, 4, 2, kernels="triton")


def test_lost_state_and_multi_token_decode_are_refused():
    key, value, params, u, cache, table = _setup(40, ties=False)
    policy = SparseKPolicy(*params, 4, 2)
    policy.begin_prefill(("r", 0), 0, 20)
    with pytest.raises(RuntimeError, match="lost the kept tokens"):
        policy.decode(("r", 0), 25, cache, table)
    policy.decode(("r", 0), 20, cache, table)
    with pytest.raises(RuntimeError, match="after its decode began"):
        policy.begin_prefill(("r", 0), 21, 24)
    policy.begin_prefill(("r", 0), 0, 10)           # a recompute starts over
    assert not policy.requests[("r", 0)].compacted
    policy.forget({("s", 0)})
    assert ("r", 0) not in policy.requests
