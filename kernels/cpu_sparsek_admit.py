# SPDX-License-Identifier: Apache-2.0
"""One SparseK decode step's bookkeeping for one request and layer on the CPU (Numba):
the token leaving the window becomes a candidate.

Per KV head h, with c = j + 1 candidates after token j joins (the policy's rule,
``vllm_sparse/sparsek/policy.py``): while c <= k token j is its own slot j; after that it
replaces the worst kept token (lowest u, the youngest among equals) when its score is
strictly greater. Its score joins the near-tau list (``cpu_sparsek_tau``: every candidate
score above z_(k+1) - 1, descending) and tau = SPARSEK's threshold over all candidates is
solved from that list (-inf while c <= k: every candidate has p = 1).

State, updated in place (Hkv KV heads, k slots):

* ``live``     [Hkv, cap] float64: the near-tau list of each head, descending, -inf after
  ``live_len``; cap > max(live_len) (the caller grows it)
* ``live_len`` [Hkv] int64
* ``slot_pos`` [Hkv, k] int64, ``slot_u`` [Hkv, k] float32: the kept tokens' positions and
  scores
* ``u``        [Hkv] float32: token j's score per head

Returns moved [Hkv] int64 (the slot token j was copied into, -1: none; the caller copies
the K/V) and tau [Hkv] float64.

Why it exists: in torch the step is about 25 small ops per request and layer (a sort of the
live scores and the sort-based SPARSEK among them), about half of SparseK's decode step on a
2-core CPU at batch 8. Reference: ``vllm_sparse.sparsek.policy.admit_torch`` (the policy's
torch path, with `kernels/sparsek_topk.py`'s SPARSEK over the list).
"""

import numba
import numpy as np
import torch

from .cpu_sparsek_tau import insert_score, solve_tau


@numba.njit(cache=True, nogil=True)
def _admit_kernel(live, live_len, slot_pos, slot_u, u, j, k, moved, tau):
    for h in range(u.shape[0]):
        x = u[h]
        moved[h] = -1
        if j < k:                                        # c = j + 1 <= k: its own slot
            slot_pos[h, j] = j
            slot_u[h, j] = x
        else:
            worst, worst_u, worst_pos = 0, slot_u[h, 0], slot_pos[h, 0]
            for s in range(1, k):
                value = slot_u[h, s]
                if value < worst_u or (value == worst_u and slot_pos[h, s] > worst_pos):
                    worst, worst_u, worst_pos = s, value, slot_pos[h, s]
            if x > worst_u:
                slot_pos[h, worst] = j
                slot_u[h, worst] = x
                moved[h] = worst
        before = live_len[h]
        live_len[h] = insert_score(live[h], before, np.float64(x), k)
        for i in range(live_len[h], before + 1):         # what was dropped reads -inf again
            live[h, i] = -np.inf
        tau[h] = solve_tau(live[h], live_len[h], k) if j >= k else -np.inf


def check_admit_args(live, live_len, slot_pos, slot_u, u, j, k) -> None:
    """The launcher's (and its reference's) argument checks."""
    heads = u.shape[0]
    if live.shape[0] != heads or slot_pos.shape != (heads, k) or slot_u.shape != (heads, k):
        raise ValueError(f"sparsek_admit: live {tuple(live.shape)}, slot_pos "
                         f"{tuple(slot_pos.shape)}, slot_u {tuple(slot_u.shape)}, u "
                         f"{tuple(u.shape)}; expected [H, cap], [H, k] x2, [H] with k={k}")
    if j < 0 or k < 1:
        raise ValueError(f"sparsek_admit: j={j}, k={k}; allowed: j >= 0, k >= 1")
    if int(live_len.max()) >= live.shape[1]:
        raise ValueError(f"sparsek_admit: live holds {live.shape[1]} scores per head and is "
                         f"full ({int(live_len.max())}); grow it first")


def cpu_sparsek_admit(live: torch.Tensor, live_len: torch.Tensor, slot_pos: torch.Tensor,
                      slot_u: torch.Tensor, u: torch.Tensor, j: int, k: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token j joins the candidates (module docstring: shapes, in-place state) ->
    (moved [Hkv] int64, tau [Hkv] float64). CPU tensors, contiguous."""
    check_admit_args(live, live_len, slot_pos, slot_u, u, j, k)
    moved = torch.empty(u.shape[0], dtype=torch.int64)
    tau = torch.empty(u.shape[0], dtype=torch.float64)
    _admit_kernel(live.numpy(), live_len.numpy(), slot_pos.numpy(), slot_u.numpy(),
                  u.float().numpy(), int(j), int(k), moved.numpy(), tau.numpy())
    return moved, tau
