# SPDX-License-Identifier: Apache-2.0
"""Tests for SparseK's decode-step bookkeeping on the CPU (kernels/cpu_sparsek_admit.py,
Numba) against its torch reference (`vllm_sparse.sparsek.policy.admit_torch`), and both
against SPARSEK over every candidate.

Each case admits a run of candidates one at a time into two copies of the same state and
compares them after every step: the slot replaced (moved), the slots, the near-tau list and
tau. Scores: normal (free sets), wide (SPARSEK's flat case), rounded (many ties: the
youngest of the equal worst kept tokens is replaced, an equal newcomer is not)."""

import pytest
import torch

# imported as the engine imports it: Numba's on-disk cache records the module name
from vllm_sparse.kernels.cpu_sparsek_admit import cpu_sparsek_admit
from vllm_sparse.kernels.sparsek_topk import sparsek
from vllm_sparse.sparsek.policy import admit_torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only kernel")

HEADS = 3
CASES = [  # (candidates, k, score scale, rounding step or None)
    (60, 8, 1.0, None),
    (200, 20, 0.3, None),       # narrow: long lists
    (150, 10, 20.0, None),      # wide: the flat case
    (150, 10, 2.0, 0.5),        # ties
    (40, 1, 1.0, None),         # k = 1
    (30, 40, 1.0, None),        # never more than k candidates
]


def _state(k, capacity):
    return (torch.full((HEADS, capacity), float("-inf"), dtype=torch.float64),
            torch.zeros(HEADS, dtype=torch.long),
            torch.full((HEADS, k), -1, dtype=torch.long),
            torch.full((HEADS, k), float("-inf")))


@pytest.mark.parametrize("n,k,scale,step", CASES)
def test_matches_reference_step_by_step(n, k, scale, step):
    gen = torch.Generator().manual_seed(n + k)
    u = torch.randn(HEADS, n, generator=gen) * scale
    u = u if step is None else torch.round(u / step) * step
    numba_state, ref_state = _state(k, n + 1), _state(k, n + 1)
    replaced = 0
    for j in range(n):
        moved, tau = cpu_sparsek_admit(*numba_state, u[:, j], j, k)
        moved_ref, tau_ref = admit_torch(*ref_state, u[:, j], j, k)
        assert torch.equal(moved, moved_ref), j
        for got, want in zip(numba_state, ref_state):
            assert torch.equal(got, want), j
        torch.testing.assert_close(tau, tau_ref, atol=1e-12, rtol=0)
        replaced += int((moved >= 0).sum())
        live, live_len, slot_pos, _ = numba_state
        candidates = u[:, :j + 1].double().sort(dim=1, descending=True).values
        if j + 1 > k:
            # tau is SPARSEK over every candidate, the list the scores above z_(k+1) - 1
            _, tau_all = sparsek(u[:, :j + 1].double(), k, kernels="torch", return_tau=True)
            torch.testing.assert_close(tau, tau_all, atol=1e-12, rtol=0)
            for h in range(HEADS):
                want = candidates[h][candidates[h] > candidates[h, k] - 1]
                assert torch.equal(live[h, :live_len[h]], want)
            # the slots hold the top-k in the total order (u descending, older first)
            order = sorted(range(j + 1), key=lambda t: (-u[0, t].item(), t))[:k]
            assert sorted(slot_pos[0].tolist()) == sorted(order)
        else:
            assert (tau == float("-inf")).all()
            assert torch.equal(live[:, :j + 1], candidates)
    assert (replaced > 0) == (n > k)


def test_full_list_and_bad_arguments():
    state = _state(2, 3)
    for j in range(3):
        cpu_sparsek_admit(*state, torch.tensor([3.0 - j] * HEADS), j, 2)   # all within 1: kept
    with pytest.raises(ValueError, match="full .*grow it first"):
        cpu_sparsek_admit(*state, torch.zeros(HEADS), 3, 2)
    with pytest.raises(ValueError, match="j=-1, k=2; allowed"):
        cpu_sparsek_admit(*_state(2, 3), torch.zeros(HEADS), -1, 2)
    with pytest.raises(ValueError, match="expected \\[H, cap\\], \\[H, k\\] x2, \\[H\\] with k=3"):
        cpu_sparsek_admit(*_state(2, 3), torch.zeros(HEADS), 0, 3)
