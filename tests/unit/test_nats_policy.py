# SPDX-License-Identifier: Apache-2.0
"""The NAtS policy against the contract (`vllm_sparse.nats.gates`): live tokens and
evictable pages checked by brute force through `gates.visible`, per-request state
(new, continued, truncated, lost, forgotten, rebuilt by a recompute), page/chunk nesting
and the tensor-parallel head split."""

import pytest
import torch

from vllm_sparse.nats import gates as G
from vllm_sparse.nats.policy import NatsPolicy, check_block_size

HKV, D = 3, 8


def _policy(chunk=16, window=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return NatsPolicy(torch.randn(HKV, 3, 2 * D, generator=g), torch.randn(HKV, 3, generator=g),
                      chunk, window)


def _random_types(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    types = torch.randint(0, 3, (HKV, n), generator=g).to(torch.int8)
    types[:, 0] = G.GLOBAL
    return types


def _seen_by(types, chunk, window, position, seq_len):
    """[Hkv, seq_len] bool: tokens the query at `position` sees, without causality (what
    it or a later query may still attend), by brute force through gates.visible."""
    later = torch.tensor([position])
    mask = G.visible(types, chunk, window, later, max(seq_len, position + 1))[:, 0, :seq_len]
    mask[:, position + 1:] = True             # future tokens: not yet written when seen
    return mask


@pytest.mark.parametrize("chunk,window", [(16, 32), (32, 0), (16, 64)])
@pytest.mark.parametrize("seed", range(4))
def test_live_tokens_are_what_gates_visible_keeps(chunk, window, seed):
    policy = _policy(chunk, window)
    types = _random_types(20, seed)
    seq_len = 20 * chunk + 7
    for position in (0, chunk * 3, chunk * 7 + 5, seq_len - 1):
        live = policy.live_tokens(types, position, seq_len)
        want = _seen_by(types, chunk, window, position, seq_len)
        for h in range(HKV):
            assert live[h][live[h] >= 0].tolist() == torch.nonzero(want[h]).flatten().tolist()


@pytest.mark.parametrize("chunk,block", [(16, 16), (32, 16), (16, 32), (64, 16)])
@pytest.mark.parametrize("seed", range(4))
def test_evictable_pages_hold_only_tokens_no_later_query_sees(chunk, block, seed):
    policy = _policy(chunk, 16)
    n = 12
    types = _random_types(n, seed)
    num_pages = 40
    for next_pos in (chunk, 5 * chunk + 3, n * chunk, n * chunk + 9):
        seq_len = max(next_pos, n * chunk)
        pages = policy.evictable_pages(types, next_pos, block, num_pages)
        dead = ~_seen_by(types, chunk, 16, next_pos, seq_len).any(dim=0)     # all heads
        dead[n * chunk:] = False                       # incomplete chunk: never evicted
        for p in range(num_pages):
            tokens = dead[p * block: (p + 1) * block]
            want = tokens.numel() == block and bool(tokens.all())
            assert bool(pages[p]) == want, (p, next_pos)
        # monotone: a page evicted stays evicted
        later = policy.evictable_pages(types, next_pos + 40, block, num_pages)
        assert bool((later | ~pages).all())


def test_visible_mask_is_gates_visible_at_the_gathered_positions():
    policy = _policy()
    types = _random_types(10)
    seq_len, first = 170, 100
    positions = policy.live_tokens(types, first, seq_len)
    query_pos = torch.arange(first, seq_len)
    mask = policy.visible(types, query_pos, positions, seq_len)            # [Q, Hkv, L]
    full = G.visible(types, 16, 32, query_pos, seq_len)                    # [Hkv, Q, K]
    for h in range(HKV):
        kept = positions[h] >= 0
        assert torch.equal(mask[:, h, kept], full[h][:, positions[h][kept]])
        assert not mask[:, h, ~kept].any()
        # the gathered tokens are all the query chunk may see
        assert int(full[h].any(0).sum()) == int(kept.sum())


def _kv(length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(HKV, length, D, generator=g), torch.randn(HKV, length, D, generator=g)


def test_state_follows_the_request_and_is_rebuilt_by_a_recompute():
    policy = _policy()
    key = ("req-0", 1)
    k, v = _kv(160)
    whole = policy.chunk_types(k, v, first_chunk=0)                          # [Hkv, 10]
    assert (whole[:, 0] == G.GLOBAL).all()
    # prefill in two uneven steps, then decode steps: the same types as all at once
    before = policy.known(key, 0)
    assert before.shape == (HKV, 0)
    types = policy.extend(key, before, k[:, :48], v[:, :48])              # 3 chunks, 50 written
    before = policy.known(key, 50)
    assert torch.equal(before, types)
    types = policy.extend(key, before, k[:, 48:112], v[:, 48:112])        # chunks 3..6
    for first in range(112, 160):
        before = policy.known(key, first)
        end = (first + 1) // 16 * 16
        start = before.shape[1] * 16
        types = policy.extend(key, before, k[:, start:end], v[:, start:end])
    assert torch.equal(types, whole)
    # a step that starts earlier than the state's end (truncation) keeps the prefix
    assert torch.equal(policy.known(key, 40), whole[:, :2])
    # a recompute from position 0 starts over and rebuilds the same types
    assert policy.known(key, 0).shape[1] == 0
    rebuilt = policy.extend(key, policy.known(key, 0), k, v)
    assert torch.equal(rebuilt, whole)
    # lost state cannot continue (its evicted pages are gone)
    with pytest.raises(RuntimeError, match="lost the chunk types of request 'req-1'"):
        policy.known(("req-1", 2), 64)


def test_forget_drops_requests_the_runner_no_longer_holds():
    policy = _policy()
    k, v = _kv(32)
    for key in [("a", 1), ("b", 2)]:
        policy.extend(key, policy.known(key, 0), k, v)
    policy.forget(None)
    assert set(policy.types) == {("a", 1), ("b", 2)}
    policy.forget(frozenset({("b", 2)}))
    assert set(policy.types) == {("b", 2)}
    # the same id resubmitted is another request (new key): no state leaks into it
    with pytest.raises(RuntimeError):
        policy.known(("a", 3), 32)


def test_no_request_identity_keeps_no_state():
    policy = _policy()
    assert policy.known(None, 64) is None
    assert policy.types == {}


@pytest.mark.parametrize("chunk,block", [(16, 16), (32, 16), (64, 16), (16, 32), (32, 32),
                                         (32, 64)])
def test_pages_and_chunks_that_nest_are_accepted(chunk, block):
    check_block_size(chunk, block)


@pytest.mark.parametrize("chunk,block", [(48, 32), (32, 48), (64, 48)])
def test_pages_and_chunks_that_do_not_nest_are_refused(chunk, block):
    with pytest.raises(ValueError, match=rf"chunk_size={chunk} .* block size {block} do not "
                                         r"nest; allowed block sizes"):
        check_block_size(chunk, block)
