# SPDX-License-Identifier: Apache-2.0
"""SPARSEK's threshold tau, exact and incremental, for the CPU kernels of SparseK (Numba).

SparseK's candidates only ever grow (a query's candidates are a prefix of the tokens; a
decode step adds the token leaving the window), and tau = SPARSEK(z, k)'s threshold only
grows with them. So a kernel keeps, per KV head, a descending list of the scores that can
still matter, buf[:m]: every score above z_(k+1) - 1 (z_(j) the j-th largest candidate
score). The others have p = 0 for good: tau >= z_(k+1) - 1 (else the top k + 1 would all
have p = 1 and sum(p) > k), and z_(k+1) never decreases. `insert_score` adds a candidate
and drops what fell below the line; `solve_tau` finds tau from the list alone.

`kernels/sparsek_topk.py` defines SPARSEK and its conventions (the flat case's midpoint
included); these functions follow them and compute in float64, as its reference does.
Used by `cpu_sparsek_rule` (prefill) and `cpu_sparsek_admit` (decode); tested through them.
"""

import numba
import numpy as np

from . import numba_setup  # noqa: F401 (Numba's threading layer, and vLLM's start-up scan)


@numba.njit(cache=True, nogil=True)
def count_at_least(buf, m, value):
    """Number of leading entries of the descending buf[:m] that are >= value."""
    lo, hi = 0, m
    while lo < hi:
        mid = (lo + hi) // 2
        if buf[mid] >= value:
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(cache=True, nogil=True)
def solve_tau(buf, m, k):
    """Exact tau of SPARSEK(z, k) for the scores z whose top m (> k) are buf[:m], descending,
    every other score being <= buf[k] - 1 (so it adds nothing to f near the root)."""
    top, nxt = buf[k - 1], buf[k]
    if top - nxt > 1.0:                                  # flat case: f = k on [nxt, top - 1]
        return (nxt + top - 1.0) * 0.5
    # f(top) <= k - 1 (only the k - 1 larger scores count, at most 1 each): walk down the
    # breakpoints (z enters the free set at t = z, leaves it, saturated, at t = z - 1) from
    # t = top. Just below t: saturated [0, sat), free [sat, entered).
    t = top
    sat = count_at_least(buf, m, t + 1.0)
    entered = count_at_least(buf, m, t)
    free_sum = 0.0
    for i in range(sat, entered):
        free_sum += buf[i]
    while True:
        t_enter = buf[entered] if entered < m else -np.inf
        t_leave = buf[sat] - 1.0 if sat < entered else -np.inf
        t_next = max(t_enter, t_leave)
        free = entered - sat
        if t_next == -np.inf or sat + free_sum - free * t_next >= k:
            if free == 0:                                # f = sat = k from t down: t is the root
                return t
            exact = 0.0                                  # the root's piece: its closed form
            for i in range(sat, entered):
                exact += buf[i]
            return (exact - (k - sat)) / free
        if t_enter >= t_leave:
            free_sum += buf[entered]
            entered += 1
        else:
            free_sum -= buf[sat]
            sat += 1
        t = t_next


@numba.njit(cache=True, nogil=True)
def insert_score(buf, m, x, k):
    """Add score x to the list buf[:m] (descending; capacity > m) -> the new length: x is
    skipped when it is <= z_(k+1) - 1 already, and entries that fell to <= z_(k+1) - 1 are
    dropped (at least k + 1 are always kept)."""
    if m > k and x <= buf[k] - 1.0:
        return m
    at = count_at_least(buf, m, x)
    for i in range(m, at, -1):
        buf[i] = buf[i - 1]
    buf[at] = x
    m += 1
    if m > k + 1:
        cut = buf[k] - 1.0
        while m > k + 1 and buf[m - 1] <= cut:
            m -= 1
    return m
