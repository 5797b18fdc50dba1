# SPDX-License-Identifier: Apache-2.0
"""The SparseK operator (Triton forward and backward, and its pure-torch reference).

Based on https://arxiv.org/abs/2406.16747 (Lou et al. 2024, "Sparser is Faster and Less is More").
For a row of scores z [n] and a budget k it is the Euclidean projection onto the capped simplex:

    p = SPARSEK(z, k) = argmin_{0 <= p <= 1, sum(p) = k} |p - z|^2 = clip(z - tau, 0, 1),

tau the root of f(t) = sum_i clip(z_i - t, 0, 1) = k. f is continuous, non-increasing and
piecewise linear with kinks ("breakpoints") at z_i and z_i - 1; on the piece containing t,
with F(t) = {i : 0 < z_i - t < 1} (free) and U(t) = #{i : z_i - t >= 1} (saturated),
f(t) = U(t) + sum_{F(t)} (z_i - t), so one Newton step t + (f(t) - k) / |F(t)| is exact there.

Conventions (shared by the kernels and the reference):
* Valid entries: column < lengths[row] and z > -inf (z is otherwise assumed finite, not NaN).
  Invalid entries get p = 0 and no gradient and do not count in n_valid.
* k >= n_valid: p = 1 on every valid entry, tau = -inf.  k <= 0: p = 0, tau = +inf.
  k may be fractional (then |F| >= 1 at the root).
* Flat case: for an integer k with z_(k) - z_(k+1) > 1 (z_(j) the j-th largest valid score),
  f = k on the whole interval [z_(k+1), z_(k) - 1]; tau is its midpoint, so p is exactly the
  hard top-k indicator and no entry sits at a kink (robust under ties, e.g. equal low scores).
* Backward: S = {valid i : tol < z_i - tau < 1 - tol} (in the compute dtype, from the saved
  tau), tol = 64 eps * max(1, |tau|) (2^-17 relative in fp32). dz = 1_S * (g - mean_S(g)),
  dk = mean_S(g); |S| = 0 gives dz = 0, dk = 0 (the flat case, k >= n_valid, k <= 0).
  Entries at a kink (z_i - tau within tol of 0 or 1) count as clipped: a one-sided derivative.
  The root lands exactly on a kink more often than "measure zero" suggests: fp16 / bf16 /
  integer scores make f(z_j) = k exactly (e.g. z_(k) - z_(k+1) = 1 with ties). tau is then
  known only to a few ulp, and the tolerance keeps such entries out of S in every
  implementation alike instead of letting the last bit of tau decide.
  Derivation: on S, tau = (sum_S z - (k - U)) / |S|, so d tau / d z_j = 1 / |S| (j in S), and
  d tau / d k = -1 / |S|.

* `sparsek` (the public launcher): p [..., n] in z's dtype, differentiable in z (and k when it
  is a floating tensor that requires grad). `kernels="auto"` runs the Triton kernels on CUDA
  and the reference elsewhere; "triton" on a CPU needs TRITON_INTERPRET=1; "torch" is the reference.
* `_sparsek_fwd_kernel`, grid (cdiv(rows, ROWS),): ROWS rows per program (short rows are
  packed up to 4096 elements), in fp32. Tile 0 (BLOCK_N <= 4096 columns) stays in registers;
  further tiles are re-read on every pass (rows longer than 4096). ITERS
  bisection steps on t in [min z - 1, max z] keep f(lo) >= k > f(hi) (so in the flat case
  they converge to its right end z_(k) - 1). Two Newton refinements on the free set follow:
  the first is exact once t is on the root's piece; from just right of a flat interval it
  lands inside it (the free set is {z_(k)}: t + (z_(k) - t) - 1, up to rounding far below the
  interval's width). |F(t)| = 0 with U(t) = k is the flat case: the second refinement returns
  tau = (max{z <= t} + min{z >= t + 1} - 1) / 2.
* `_sparsek_bwd_kernel`, same grid: pass 1 sums g and counts over S, pass 2 writes dz.
* `sparsek_ref`: the same operator in pure torch (an autograd.Function with the analytic
  backward). tau is found exactly, sort-based and in float64: f at all 2n sorted breakpoints
  (prefix sums), the piece whose ends bracket k, one Newton step from its midpoint (exact on
  that piece); the flat case from the sorted scores. Long rows are first cut to their top
  max k + 1 + 64 scores where that provably leaves tau unchanged (`_tau_banded_ref`).
"""

import os

import torch
import triton
import triton.language as tl

DEFAULT_ITERS = 32  # bisection steps: width (max z - min z + 1) / 2^32, below fp32 resolution
_INF = float("inf")


def _kink_tol(dtype: torch.dtype) -> float:
    """Relative width of the kinks in the backward's free set: 64 machine epsilons (2^-17 in fp32)."""
    return 64 * torch.finfo(dtype).eps


@triton.jit
def _load_tile(z_rows, stride_col, c0, n_valid, BLOCK_N: tl.constexpr):
    """fp32 [ROWS, BLOCK_N] tile of columns [c0, c0 + BLOCK_N) of the rows at pointers z_rows [ROWS];
    columns >= n_valid [ROWS] read as -inf (invalid)."""
    offs = c0 + tl.arange(0, BLOCK_N)
    return tl.load(z_rows[:, None] + offs.to(tl.int64)[None, :] * stride_col, mask=offs[None, :] < n_valid[:, None],
                   other=float("-inf")).to(tl.float32)


@triton.jit
def _ramp_sum(z, t):
    """sum clip(z - t, 0, 1) per row of a tile, t [ROWS] (-inf entries add 0)."""
    return tl.sum(tl.minimum(tl.maximum(z - t[:, None], 0.0), 1.0), 1)


@triton.jit
def _piece_stats(z, t):
    """(|F|, sum_F (z - t), U, max{z <= t}, min{z >= t + 1}) per row of a tile at t [ROWS]."""
    d = z - t[:, None]
    free = (d > 0.0) & (d < 1.0)
    sat = d >= 1.0
    return (tl.sum(free.to(tl.float32), 1), tl.sum(tl.where(free, d, 0.0), 1), tl.sum(sat.to(tl.float32), 1),
            tl.max(tl.where(d <= 0.0, z, float("-inf")), 1), tl.min(tl.where(sat, z, float("inf")), 1))


@triton.jit
def _refine(z0, z_rows, stride_col, n_valid, n_max, t, k, BLOCK_N: tl.constexpr):
    """Newton step on the piece at t; |F| = 0 with U = k (flat case): the flat interval's midpoint."""
    nf, sd, ns, below, above = _piece_stats(z0, t)
    for c0 in range(BLOCK_N, n_max, BLOCK_N):
        a, b, c, d, e = _piece_stats(_load_tile(z_rows, stride_col, c0, n_valid, BLOCK_N), t)
        nf, sd, ns = nf + a, sd + b, ns + c
        below, above = tl.maximum(below, d), tl.minimum(above, e)
    newton = t + (sd - (k - ns)) / tl.maximum(nf, 1.0)
    below = tl.where(below > float("-inf"), below, t)  # (no entry below / above: not flat; keep it finite)
    above = tl.where(above < float("inf"), above, t + 1.0)
    flat = (below + above - 1.0) * 0.5
    return tl.where(nf > 0.0, newton, tl.where(ns == k, flat, t))


@triton.jit
def _row_block(len_ptr, n_rows, n_cols, HAS_LENGTHS: tl.constexpr, ROWS: tl.constexpr):
    """(rows [ROWS] int64, row mask, valid columns [ROWS] (0 past the last row), max of those)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    r_mask = rows < n_rows
    n_valid = tl.where(r_mask, n_cols, 0)
    if HAS_LENGTHS:
        n_valid = tl.minimum(tl.maximum(tl.load(len_ptr + rows, mask=r_mask, other=0), 0), n_valid).to(tl.int32)
    return rows, r_mask, n_valid, tl.max(n_valid, 0)


@triton.jit
def _sparsek_fwd_kernel(
    z_ptr,  # [R, n] scores, fp16 / bf16 / fp32
    k_ptr,  # [R] fp32 budget
    len_ptr,  # [R] int32 / int64 valid columns (HAS_LENGTHS; unused otherwise)
    p_ptr,  # [R, n] out, z's dtype
    tau_ptr,  # [R] fp32 out
    n_rows,
    n_cols,
    stride_z_row, stride_z_col,
    stride_p_row, stride_p_col,
    HAS_LENGTHS: tl.constexpr,
    ROWS: tl.constexpr,  # rows per program (power of two)
    BLOCK_N: tl.constexpr,  # columns per tile (power of two)
    ITERS: tl.constexpr,  # bisection steps
):
    rows, r_mask, n_valid, n_max = _row_block(len_ptr, n_rows, n_cols, HAS_LENGTHS, ROWS)
    z_rows = z_ptr + rows * stride_z_row
    k = tl.load(k_ptr + rows, mask=r_mask, other=0.0)

    z0 = _load_tile(z_rows, stride_z_col, 0, n_valid, BLOCK_N)
    z_max = tl.max(z0, 1)
    z_min = tl.min(tl.where(z0 > float("-inf"), z0, float("inf")), 1)
    count = tl.sum((z0 > float("-inf")).to(tl.float32), 1)
    for c0 in range(BLOCK_N, n_max, BLOCK_N):
        z = _load_tile(z_rows, stride_z_col, c0, n_valid, BLOCK_N)
        z_max = tl.maximum(z_max, tl.max(z, 1))
        z_min = tl.minimum(z_min, tl.min(tl.where(z > float("-inf"), z, float("inf")), 1))
        count += tl.sum((z > float("-inf")).to(tl.float32), 1)

    # bisection: f(lo) >= k > f(hi)
    lo = tl.where(count > 0.0, z_min - 1.0, 0.0)
    hi = tl.where(count > 0.0, z_max, 0.0)
    for _ in range(ITERS):
        mid = (lo + hi) * 0.5
        f = _ramp_sum(z0, mid)
        for c0 in range(BLOCK_N, n_max, BLOCK_N):
            f += _ramp_sum(_load_tile(z_rows, stride_z_col, c0, n_valid, BLOCK_N), mid)
        lo = tl.where(f >= k, mid, lo)
        hi = tl.where(f < k, mid, hi)
    t = _refine(z0, z_rows, stride_z_col, n_valid, n_max, (lo + hi) * 0.5, k, BLOCK_N)
    t = _refine(z0, z_rows, stride_z_col, n_valid, n_max, t, k, BLOCK_N)
    tau = tl.where(k >= count, float("-inf"), tl.where(k <= 0.0, float("inf"), t))
    tl.store(tau_ptr + rows, tau, mask=r_mask)

    p_rows = p_ptr + rows * stride_p_row
    for c0 in range(0, n_cols, BLOCK_N):
        offs = (c0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        z = _load_tile(z_rows, stride_z_col, c0, n_valid, BLOCK_N)
        valid = z > float("-inf")
        p = tl.minimum(tl.maximum(tl.where(valid, z, 0.0) - tau[:, None], 0.0), 1.0)
        tl.store(p_rows[:, None] + offs[None, :] * stride_p_col, tl.where(valid, p, 0.0).to(p_ptr.dtype.element_ty),
                 mask=r_mask[:, None] & (offs < n_cols)[None, :])


@triton.jit
def _free_set(z_rows, g_rows, stride_z_col, stride_g_col, c0, n_valid, tau, tol, BLOCK_N: tl.constexpr):
    """(S mask, g fp32) of a [ROWS, BLOCK_N] tile: S = {tol < z - tau < 1 - tol}."""
    offs = (c0 + tl.arange(0, BLOCK_N)).to(tl.int64)
    z = _load_tile(z_rows, stride_z_col, c0, n_valid, BLOCK_N)
    valid = z > float("-inf")
    d = tl.where(valid, tl.where(valid, z, 0.0) - tau[:, None], 0.0)  # invalid: d = 0, not free (no inf - inf)
    g = tl.load(g_rows[:, None] + offs[None, :] * stride_g_col, mask=offs[None, :] < n_valid[:, None], other=0.0)
    return (d > tol[:, None]) & (d < 1.0 - tol[:, None]), g.to(tl.float32)


@triton.jit
def _sparsek_bwd_kernel(
    z_ptr,  # [R, n] scores
    tau_ptr,  # [R] fp32 (forward)
    len_ptr,  # [R] int32 / int64 (HAS_LENGTHS; unused otherwise)
    g_ptr,  # [R, n] dL/dp
    dz_ptr,  # [R, n] out, z's dtype
    dk_ptr,  # [R] fp32 out: mean_S(g)
    n_rows,
    n_cols,
    stride_z_row, stride_z_col,
    stride_g_row, stride_g_col,
    stride_dz_row, stride_dz_col,
    HAS_LENGTHS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KINK_TOL: tl.constexpr,  # S = {tol < z - tau < 1 - tol}, tol = KINK_TOL * max(1, |tau|)
):
    rows, r_mask, n_valid, n_max = _row_block(len_ptr, n_rows, n_cols, HAS_LENGTHS, ROWS)
    z_rows = z_ptr + rows * stride_z_row
    g_rows = g_ptr + rows * stride_g_row
    tau = tl.load(tau_ptr + rows, mask=r_mask, other=float("inf"))
    tol = KINK_TOL * tl.maximum(tl.abs(tau), 1.0)  # +-inf for the all-or-nothing rows: S empty
    size = tl.zeros([ROWS], dtype=tl.float32)
    g_sum = tl.zeros([ROWS], dtype=tl.float32)
    for c0 in range(0, n_max, BLOCK_N):
        free, g = _free_set(z_rows, g_rows, stride_z_col, stride_g_col, c0, n_valid, tau, tol, BLOCK_N)
        size += tl.sum(free.to(tl.float32), 1)
        g_sum += tl.sum(tl.where(free, g, 0.0), 1)
    mean = g_sum / tl.maximum(size, 1.0)
    tl.store(dk_ptr + rows, mean, mask=r_mask)

    dz_rows = dz_ptr + rows * stride_dz_row
    for c0 in range(0, n_cols, BLOCK_N):
        offs = (c0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        free, g = _free_set(z_rows, g_rows, stride_z_col, stride_g_col, c0, n_valid, tau, tol, BLOCK_N)
        tl.store(dz_rows[:, None] + offs[None, :] * stride_dz_col,
                 tl.where(free, g - mean[:, None], 0.0).to(dz_ptr.dtype.element_ty),
                 mask=r_mask[:, None] & (offs < n_cols)[None, :])


def _tiles(rows: int, n: int, block_n: int | None) -> tuple[int, int, int]:
    """(ROWS, BLOCK_N, num_warps): tiles of up to 4096 columns; short rows packed into one
    program up to 4096 elements (on CUDA and under the interpreter, which pays per op)."""
    block = block_n or min(triton.next_power_of_2(max(n, 1)), 4096)
    assert block >= 1 and block & (block - 1) == 0, "block_n must be a power of two"
    rows_per = min(triton.next_power_of_2(rows), max(1, 4096 // block))
    return rows_per, block, max(1, min(16, rows_per * block // 256))


def _forward_triton(z, k, lengths, iters, block_n):
    """(p [R, n] z's dtype, tau [R] fp32) for z [R, n] (any strides), k [R] fp32, lengths [R] or None."""
    assert z.dtype in (torch.float16, torch.bfloat16, torch.float32), f"Triton path: fp16/bf16/fp32, got {z.dtype}"
    rows, n = z.shape
    p = torch.empty((rows, n), dtype=z.dtype, device=z.device)
    tau = torch.empty(rows, dtype=torch.float32, device=z.device)
    if rows == 0:
        return p, tau
    rows_per, block, warps = _tiles(rows, n, block_n)
    _sparsek_fwd_kernel[(triton.cdiv(rows, rows_per),)](
        z, k, k if lengths is None else lengths, p, tau, rows, n, *z.stride(), *p.stride(),
        HAS_LENGTHS=lengths is not None, ROWS=rows_per, BLOCK_N=block, ITERS=iters, num_warps=warps,
    )
    return p, tau


def _backward_triton(z, tau, lengths, g, block_n):
    """(dz [R, n] z's dtype, dk [R] fp32)."""
    rows, n = z.shape
    dz = torch.empty((rows, n), dtype=z.dtype, device=z.device)
    dk = torch.empty(rows, dtype=torch.float32, device=z.device)
    if rows == 0:
        return dz, dk
    rows_per, block, warps = _tiles(rows, n, block_n)
    _sparsek_bwd_kernel[(triton.cdiv(rows, rows_per),)](
        z, tau, tau if lengths is None else lengths, g, dz, dk, rows, n, *z.stride(), *g.stride(), *dz.stride(),
        HAS_LENGTHS=lengths is not None, ROWS=rows_per, BLOCK_N=block, KINK_TOL=_kink_tol(torch.float32),
        num_warps=warps,
    )
    return dz, dk


# ---- PyTorch reference ----

def _masked_ref(z, lengths):
    """z [R, n] in float64 with -inf at invalid entries (column >= lengths[row])."""
    z = z.double()
    if lengths is None:
        return z
    return z.masked_fill(torch.arange(z.shape[1], device=z.device) >= lengths[:, None], -_INF)


def _tau_ref(z, k):
    """Exact tau [R] (float64) for z [R, n] float64 (-inf = invalid), k [R] float64; module conventions."""
    rows, n = z.shape
    valid = z > -_INF
    nv = valid.sum(-1)
    if n == 0:
        return torch.full_like(k, -_INF)
    a = z.masked_fill(~valid, _INF).sort(-1).values  # ascending, invalid (+inf) last
    prefix = torch.nn.functional.pad(a.masked_fill(a == _INF, 0).cumsum(-1), (1, 0))
    b = torch.cat([a, a - 1], -1).sort(-1).values  # the 2n breakpoints, invalid last
    finite = b < _INF
    b0 = b.masked_fill(~finite, 0)
    i1 = torch.searchsorted(a, b0, right=True)  # #{z <= b}
    i2 = torch.searchsorted(a, b0 + 1)  # #{z < b + 1}
    f = (nv[:, None] - i2) + prefix.gather(-1, i2) - prefix.gather(-1, i1) - (i2 - i1) * b0
    f = f.masked_fill(~finite, -_INF)
    # the piece [b_j, b_j+1] with f(b_j) >= k > f(b_j+1); one Newton step from its midpoint
    j = ((f >= k[:, None]).sum(-1) - 1).clamp(0, max(2 * n - 2, 0))
    t = b.gather(-1, torch.stack([j, j + 1], -1).clamp(max=2 * n - 1)).mean(-1)
    t = t.masked_fill(~torch.isfinite(t), 0)
    d = z - t[:, None]
    free = (d > 0) & (d < 1)
    size = free.sum(-1)
    tau = t + (torch.where(free, d, 0).sum(-1) - (k - (d >= 1).sum(-1))) / size.clamp(min=1)
    # flat case: integer k with z_(k) - z_(k+1) > 1 (j-th largest = a[nv - j])
    top = a.gather(-1, (nv - k.long()).clamp(0, n - 1)[:, None])[:, 0]
    nxt = a.gather(-1, (nv - k.long() - 1).clamp(0, n - 1)[:, None])[:, 0]
    flat = (k == k.floor()) & (k > 0) & (k < nv) & (top - nxt > 1)
    tau = torch.where(flat, (nxt + top - 1) * 0.5, tau)
    return torch.where(k >= nv, -_INF, torch.where(k <= 0, _INF, tau))


def _tau_banded_ref(z, k, margin: int = 64):
    """`_tau_ref` computed on each row's top m = max k + 1 + margin scores where that is exact.

    With j = floor(k) + 1 (> k), tau >= z_(j) - 1: else the top j entries all have p = 1 and
    f(tau) >= j > k. So every entry with z <= z_(j) - 1 has p = 0 and leaves f unchanged on
    [z_(j) - 1, inf), where the root lies; the flat case and k >= n_valid read only the top
    j + 1 <= m entries. A row whose m-th largest score is <= z_(j) - 1 (or -inf: at most m
    valid) therefore has the same tau from its top m; other rows take `_tau_ref` whole.
    Training rows have n ~ 4k and m ~ k: most of the sort-and-search work goes away.
    """
    rows, n = z.shape
    m = int(k.clamp(0, n).max().ceil().item()) + 1 + margin if rows else n
    if m >= n:
        return _tau_ref(z, k)
    top = z.topk(m, dim=-1).values                                       # descending, -inf last
    j = (k.floor().long() + 1).clamp(1, m)
    exact = top[:, -1] <= top.gather(-1, (j - 1)[:, None])[:, 0] - 1
    tau = _tau_ref(top, k)
    rest = (~exact).nonzero()[:, 0]
    if len(rest):
        tau[rest] = _tau_ref(z[rest], k[rest])
    return tau


def _forward_ref(z, k, lengths):
    """(p [R, n] z's dtype, tau [R]): tau exact in float64, rounded to the compute dtype (fp32, fp64 for fp64 z)."""
    ct = torch.float64 if z.dtype == torch.float64 else torch.float32
    zm = _masked_ref(z, lengths)
    tau = _tau_banded_ref(zm, k.double()).to(ct)
    valid = zm > -_INF
    p = (zm.to(ct).masked_fill(~valid, 0) - tau[:, None]).clamp(0, 1).masked_fill(~valid, 0)
    return p.to(z.dtype), tau


def _backward_ref(z, tau, lengths, g):
    """(dz [R, n] z's dtype, dk [R]): S = {tol < z - tau < 1 - tol} in tau's dtype; dz = 1_S (g - mean_S g)."""
    zm = _masked_ref(z, lengths)
    valid = zm > -_INF
    d = zm.to(tau.dtype).masked_fill(~valid, 0) - tau[:, None]
    tol = (_kink_tol(tau.dtype) * tau.abs().clamp(min=1))[:, None]
    free = valid & (d > tol) & (d < 1 - tol)
    g = g.to(tau.dtype).masked_fill(~free, 0)
    mean = g.sum(-1) / free.sum(-1).clamp(min=1)
    return (g - mean[:, None]).masked_fill(~free, 0).to(z.dtype), mean


class SparseKFunction(torch.autograd.Function):
    """p, tau = SPARSEK(z, k) over the last dim; Triton kernels or the torch reference (`use_triton`)."""

    @staticmethod
    def forward(ctx, z, k, lengths, use_triton, iters, block_n):
        """z [..., n]; k and lengths (or None) [...] (= z.shape[:-1])."""
        batch, n = z.shape[:-1], z.shape[-1]
        z2, k_rows = z.reshape(batch.numel(), n), k.reshape(-1)
        len_rows = None if lengths is None else lengths.reshape(-1).contiguous()
        if use_triton:
            p, tau = _forward_triton(z2, k_rows.float().contiguous(), len_rows, iters, block_n)
        else:
            p, tau = _forward_ref(z2, k_rows, len_rows)
        ctx.save_for_backward(z2, tau, len_rows)
        ctx.use_triton, ctx.block_n, ctx.k_dtype = use_triton, block_n, k.dtype
        ctx.mark_non_differentiable(tau)
        return p.view(z.shape), tau.view(batch)

    @staticmethod
    def backward(ctx, dp, _dtau):
        z2, tau, len_rows = ctx.saved_tensors
        g = dp.reshape(z2.shape)
        if ctx.use_triton:
            dz, dk = _backward_triton(z2, tau, len_rows, g, ctx.block_n)
        else:
            dz, dk = _backward_ref(z2, tau, len_rows, g)
        dk = dk.view(dp.shape[:-1]).to(ctx.k_dtype) if ctx.needs_input_grad[1] else None
        return dz.view(dp.shape), dk, None, None, None, None


def _use_triton(kernels: str, z: torch.Tensor) -> bool:
    """'auto': Triton on CUDA (fp64 scores: torch), torch elsewhere; 'triton' on a CPU needs the
    interpreter (tests)."""
    assert kernels in ("auto", "triton", "torch"), f"kernels must be auto|triton|torch, got {kernels!r}"
    if kernels == "triton" and not z.is_cuda:
        assert os.environ.get("TRITON_INTERPRET") == "1", "kernels='triton' on a CPU needs TRITON_INTERPRET=1"
    return kernels == "triton" or (kernels == "auto" and z.is_cuda and z.dtype != torch.float64)


def sparsek(z: torch.Tensor, k, lengths: torch.Tensor | None = None, *, kernels: str = "auto",
            return_tau: bool = False, iters: int = DEFAULT_ITERS, block_n: int | None = None):
    """SPARSEK(z, k) over the last dim (module docstring): p = clip(z - tau, 0, 1), sum(p) = k.

    Args:
        z: [..., n] scores, fp16 / bf16 / fp32 (fp64: reference only), any strides; -inf = masked.
        k: budget: a number, or a tensor broadcastable to z.shape[:-1] (int or float; a float
            tensor that requires grad gets dk = mean_S(dp)).
        lengths: None or an int tensor broadcastable to z.shape[:-1]: columns >= lengths are masked.
        kernels: "auto" (Triton on CUDA unless z is fp64, torch elsewhere), "triton" or "torch" (the reference).
        return_tau: also return tau [...] (fp32; fp64 for fp64 z on the reference; not differentiable).
        iters: bisection steps (Triton).  block_n: columns per tile (Triton; power of two).

    Returns:
        p [..., n] in z's dtype, or (p, tau).
    """
    assert z.dim() >= 1, "z must be [..., n]"
    batch = z.shape[:-1]
    k = k if isinstance(k, torch.Tensor) else torch.tensor(float(k), device=z.device)
    k = k.to(torch.float64 if z.dtype == torch.float64 else torch.float32).expand(batch)  # differentiable
    if lengths is not None:
        assert not lengths.is_floating_point(), "lengths must be an int tensor"
        lengths = lengths.expand(batch)
    p, tau = SparseKFunction.apply(z, k, lengths, _use_triton(kernels, z), iters, block_n)
    return (p, tau) if return_tau else p


def sparsek_ref(z: torch.Tensor, k, lengths: torch.Tensor | None = None, *, return_tau: bool = False):
    """The pure-torch SPARSEK (same arguments and result as `sparsek`; exact tau, analytic backward)."""
    return sparsek(z, k, lengths, kernels="torch", return_tau=return_tau)
