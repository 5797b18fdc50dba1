# SPDX-License-Identifier: Apache-2.0
"""Tests for the SparseK operator (kernels/sparsek_topk.py).

The reference is checked against the operator's definition, a float64 brute-force bisection,
torch.autograd.gradcheck and autograd through a sort-based closed form; the Triton kernels
(forward and backward) against the reference, under TRITON_INTERPRET=1 without a GPU.
"""

import pytest
import torch
from paged_inputs import DEVICE  # noqa: I001 (first: sets TRITON_INTERPRET, sys.path)

from kernels.sparsek_topk import (  # noqa: E402
    _backward_ref, _backward_triton, _tau_banded_ref, _tau_ref, sparsek, sparsek_ref)

# Row shapes: one entry, a 7-wide row (n not a power of two), extra batch dims, 100 and
# 1000 columns (one 128 / 1024-wide tile under the interpreter).
SHAPES = [(1, 1), (3, 7), (2, 3, 50), (4, 100), (2, 1000)]
# Budgets: hard top-1 and top-3 (integer, often the flat case), a fractional budget, and one
# per row (a tensor mixing 0, fractional, integer, >= n; built by _row_k).
BUDGETS = [1, 3, 2.5, "per-row"]
# fp32 checks the math; fp16 is the low-precision input the interpreter handles (bf16: GPU test).
# (dtype, p/dz atol, rtol): both compute in fp32 from the same inputs; p and dz are rounded to dtype.
# fp32: observed p error <= 2.4e-7 (2 ulp of z - tau).
DTYPES = [(torch.float32, 1e-6, 1e-6), (torch.float16, 1e-3, 1e-3)]
# kernel: fp32 bisection + Newton; reference: exact in fp64, rounded. Observed <= 1.2e-7 relative;
# tight enough that a tau shifted by 1e-6 fails.
TAU_TOL = dict(atol=5e-7, rtol=5e-7)


def _scores(shape, dtype=torch.float64, seed=0, scale=2.0):
    """Random scores; scale 2 puts a few entries in the free set at small k (no ties in fp32/fp64)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _row_k(batch, n, dtype=torch.float32, seed=1):
    """Per-row budgets cycling through 0, 1.5, 1, n // 2 + 0.25, n, n + 3 (clamped cases included)."""
    choices = torch.tensor([0, 1.5, 1, n // 2 + 0.25, n, n + 3], dtype=torch.float64)
    idx = torch.randperm(int(torch.tensor(batch).prod()), generator=torch.Generator().manual_seed(seed)) % 6
    return choices[idx].view(batch).to(dtype).to(DEVICE)


def _budget(budget, batch, n, dtype=torch.float32):
    return _row_k(batch, n, dtype) if budget == "per-row" else budget


def _lengths(batch, n, seed=2):
    """Per-row valid lengths in [0, n + 2] (0: empty row; > n: no masking)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n + 3, batch, generator=gen).to(DEVICE)


def _valid(z, lengths):
    valid = z > float("-inf")
    if lengths is not None:
        valid &= torch.arange(z.shape[-1], device=z.device) < lengths[..., None]
    return valid


def _bisect64(z, k, lengths=None, iters=200):
    """Brute force: bisection on tau in float64 until the bracket stops shrinking; p = clip(z - tau, 0, 1)."""
    valid = _valid(z, lengths)
    z = z.double().masked_fill(~valid, 0)
    k = torch.as_tensor(k, dtype=torch.float64, device=z.device).expand(z.shape[:-1])
    k = torch.minimum(k, valid.sum(-1).double())
    lo = z.masked_fill(~valid, float("inf")).amin(-1) - 1
    hi = z.masked_fill(~valid, float("-inf")).amax(-1)
    lo, hi = lo.clamp(min=-1e9), hi.clamp(max=1e9)
    for _ in range(iters):
        mid = (lo + hi) / 2
        f = ((z - mid[..., None]).clamp(0, 1) * valid).sum(-1)
        lo, hi = torch.where(f > k, mid, lo), torch.where(f > k, hi, mid)
    return ((z - hi[..., None]).clamp(0, 1) * valid).masked_fill(k[..., None] <= 0, 0)


def _sort_closed_form(z, k, lengths=None):
    """Differentiable SPARSEK through torch.sort: the counts (saturated U, free |S|) come from the
    reference, tau = (sum of the sorted scores U..U+|S|-1 - (k - U)) / |S|, then clip. Autograd of
    this is an independent Jacobian of the same function (valid where no entry sits at a kink)."""
    p_ref = sparsek_ref(z.detach(), k.detach() if isinstance(k, torch.Tensor) else k, lengths)
    valid = _valid(z, lengths)
    free = valid & (p_ref > 0) & (p_ref < 1)
    sat, size = (valid & (p_ref == 1)).sum(-1), free.sum(-1)
    col = torch.arange(z.shape[-1], device=z.device)
    s = z.masked_fill(~valid, float("-inf")).sort(-1, descending=True).values  # valid first
    s = s.masked_fill(col >= valid.sum(-1, keepdim=True), 0)
    block = (col >= sat[..., None]) & (col < (sat + size)[..., None])
    tau = ((s * block).sum(-1) - (k - sat)) / size.clamp(min=1)
    p = (z - tau[..., None]).clamp(0, 1)
    return torch.where(free, p, p_ref.to(z.dtype)).masked_fill(~valid, 0)


# ---- the reference ----

@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masking", ["none", "lengths", "-inf"])
def test_reference_properties(shape, budget, masking):
    """sum p = min(k, n_valid), 0 <= p <= 1, p = clip(z - tau, 0, 1), = a float64 bisection."""
    batch, n = shape[:-1], shape[-1]
    z = _scores(shape)
    k = _budget(budget, batch, n, torch.float64)
    lengths = _lengths(batch, n) if masking == "lengths" else None
    if masking == "-inf":
        z = z.masked_fill(_scores(shape, seed=3) > 2.0, float("-inf"))
    p, tau = sparsek_ref(z, k, lengths, return_tau=True)
    valid = _valid(z, lengths)
    k_rows = torch.as_tensor(k, dtype=torch.float64).expand(batch)
    assert p.dtype == torch.float64 and tau.shape == batch
    torch.testing.assert_close(p.sum(-1), torch.minimum(k_rows.clamp(min=0), valid.sum(-1).double()))
    assert torch.all((p >= 0) & (p <= 1)) and torch.all(p[~valid] == 0)
    clip = (z - tau[..., None]).clamp(0, 1).masked_fill(~valid, 0)
    torch.testing.assert_close(p, clip, atol=0, rtol=0)
    torch.testing.assert_close(p, _bisect64(z, k, lengths), atol=1e-9, rtol=0)


def test_reference_edge_cases():
    """k >= n: ones (tau = -inf); k <= 0: zeros (tau = +inf); lengths = masking with -inf =
    truncating the row; an empty row; fp32 / fp16 inputs keep their dtype, tau is fp32."""
    z = _scores((3, 9))
    for k in (9, 9.0, 20):
        p, tau = sparsek_ref(z, k, return_tau=True)
        assert torch.all(p == 1) and torch.all(tau == float("-inf"))
    p, tau = sparsek_ref(z, 0, return_tau=True)
    assert torch.all(p == 0) and torch.all(tau == float("inf"))
    lengths = torch.tensor([4, 0, 12], device=DEVICE)
    p = sparsek_ref(z, 2.5, lengths)
    assert torch.all(p[0, 4:] == 0) and torch.all(p[1] == 0)
    torch.testing.assert_close(p[0, :4], sparsek_ref(z[0, :4], 2.5), atol=0, rtol=0)
    torch.testing.assert_close(p[2], sparsek_ref(z[2], 2.5), atol=0, rtol=0)
    masked = z.masked_fill(torch.arange(9, device=DEVICE) >= lengths.clamp(max=9)[:, None], float("-inf"))
    torch.testing.assert_close(sparsek_ref(masked, 2.5), p, atol=0, rtol=0)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        p, tau = sparsek_ref(z.to(dtype), 2.5, return_tau=True)
        assert p.dtype == dtype and tau.dtype == torch.float32
    assert sparsek_ref(z[:, :0], 2).shape == (3, 0) and sparsek_ref(z[:0], 2).shape == (0, 9)


def test_reference_flat_case_and_ties():
    """Integer k with a gap > 1 after the k-th score: tau is the middle of the flat interval
    [z_(k+1), z_(k) - 1], p the exact top-k indicator, and no gradient; this holds under ties."""
    z = torch.tensor([[5.0, 4.0, 0.0, 0.0, 0.0, 0.0], [0.3, 3.0, 0.3, -1.0, 3.0, 0.3]], dtype=torch.float64,
                     device=DEVICE, requires_grad=True)
    p, tau = sparsek_ref(z, 2, return_tau=True)
    torch.testing.assert_close(tau, torch.tensor([1.5, 1.15], dtype=torch.float64, device=DEVICE))
    assert torch.equal(p, (z >= 3).double())
    p.backward(torch.randn_like(p))
    assert torch.all(z.grad == 0)
    # one more than the flat budget: the tied zeros share the rest equally and get the gradient
    z.grad = None
    p, tau = sparsek_ref(z[:1], 3, return_tau=True)
    torch.testing.assert_close(p, torch.tensor([[1, 1, 0.25, 0.25, 0.25, 0.25]], dtype=torch.float64,
                                               device=DEVICE))
    p.backward(torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], dtype=torch.float64, device=DEVICE))
    torch.testing.assert_close(z.grad[0], torch.tensor([0, 0, -1.5, -0.5, 0.5, 1.5], dtype=torch.float64,
                                                       device=DEVICE))


@pytest.mark.parametrize("margin", [0, 8, 64])
def test_reference_banded_tau_equals_whole_rows(margin):
    """The top-m cut of `_tau_banded_ref` gives `_tau_ref`'s tau on whole rows, both for rows
    whose band fits in m (they take the cut) and for rows that do not (dense scores: they fall
    back): fractional and integer k, flat-case gaps, ties, -inf entries and short rows."""
    n, gen = 300, torch.Generator().manual_seed(5)
    spread = torch.randn(8, n, generator=gen, dtype=torch.float64) * 2.0      # band fits
    dense = torch.randn(8, n, generator=gen, dtype=torch.float64) * 0.01     # band overflows
    ties = (torch.randn(8, n, generator=gen, dtype=torch.float64) * 2).round() / 2
    flat = spread.clone()
    flat[:, :5] += 10.0                                                      # gap > 1 after the top 5
    short = spread.masked_fill(torch.rand(8, n, generator=gen, dtype=torch.float64) > 0.1, float("-inf"))
    z = torch.cat([spread, dense, ties, flat, short]).to(DEVICE)
    k = torch.tensor([1, 3, 2.5, 7.75, 40, 0, 5, 300], dtype=torch.float64).repeat(5).to(DEVICE)
    k_small = k.clamp(max=40)               # k = 300 = n makes m >= n: whole rows; 40 cuts them
    m = int(k_small.max()) + 1 + margin
    top = z.topk(m, dim=-1).values
    j = (k_small.floor().long() + 1).clamp(1, m)
    cut = top[:, -1] <= top.gather(-1, (j - 1)[:, None])[:, 0] - 1
    assert 0 < int(cut.sum()) < len(cut), "both branches must run"
    for budget in (k, k_small):
        torch.testing.assert_close(_tau_banded_ref(z, budget, margin), _tau_ref(z, budget),
                                   atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("shape,k", [((3, 7), 2.5), ((2, 12), 4), ((2, 2, 9), "per-row")])
def test_reference_gradcheck(shape, k):
    """torch.autograd.gradcheck (float64 finite differences) of dz, and of dk for a tensor k."""
    batch, n = shape[:-1], shape[-1]
    z = _scores(shape, scale=0.7, seed=4).requires_grad_()  # scale 0.7: several free entries a row
    if k == "per-row":
        k = (torch.rand(batch, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * (n - 1)
             + 0.5).to(DEVICE).requires_grad_()
        lengths = torch.full(batch, n - 2, device=DEVICE)
        assert torch.autograd.gradcheck(lambda z, k: sparsek_ref(z, k, lengths), (z, k))
    else:
        assert torch.autograd.gradcheck(lambda z: sparsek_ref(z, k), (z,))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("budget", BUDGETS)
def test_reference_backward_matches_sort_autograd(shape, budget):
    """The analytic backward equals autograd through `_sort_closed_form` (dz and, per row, dk)."""
    batch, n = shape[:-1], shape[-1]
    z = _scores(shape, seed=6).requires_grad_()
    k = _budget(budget, batch, n, torch.float64)
    if isinstance(k, torch.Tensor):
        k.requires_grad_()
    lengths = _lengths(batch, n)
    g = _scores(shape, seed=7)
    inputs = (z, k) if isinstance(k, torch.Tensor) else (z,)
    analytic = torch.autograd.grad(sparsek_ref(z, k, lengths), inputs, g)
    closed = torch.autograd.grad(_sort_closed_form(z, k, lengths), inputs, g)
    for a, c in zip(analytic, closed):
        torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-12)


# ---- the Triton kernels ----

def _kernel_case(shape, budget, dtype, *, lengths=False, neg_inf=False, strided=False, seed=0):
    """(z, k, lengths, g): z of `dtype` (a strided view if asked), -inf entries if asked."""
    batch, n = shape[:-1], shape[-1]
    z = _scores(shape, torch.float32, seed=seed)
    if neg_inf:
        z = z.masked_fill(_scores(shape, seed=seed + 1) > 2.0, float("-inf"))
    if strided:  # every other column of a wider buffer (column stride 2)
        base = torch.zeros(*batch, 2 * n, dtype=dtype, device=DEVICE)
        base[..., ::2] = z.to(dtype)
        z = base[..., ::2]
    else:
        z = z.to(dtype)
    return (z, _budget(budget, batch, n), _lengths(batch, n, seed=seed + 2) if lengths else None,
            _scores(shape, dtype, seed=seed + 3))


def _check_kernel(z, k, lengths, g, atol, rtol, tau_tol=TAU_TOL, **kw):
    """Forward (p, tau) and backward (dz, dk for a tensor k) of the kernels against the reference."""
    results = []
    for kernels in ("triton", "torch"):
        zz = z.detach().clone().requires_grad_()
        kk = k.detach().clone().requires_grad_() if isinstance(k, torch.Tensor) else k
        p, tau = sparsek(zz, kk, lengths, kernels=kernels, return_tau=True, **kw)
        p.backward(g)
        results.append((p, tau, zz.grad, kk.grad if isinstance(kk, torch.Tensor) else None))
    (p, tau, dz, dk), (p_ref, tau_ref, dz_ref, dk_ref) = results
    assert p.dtype == z.dtype and dz.dtype == z.dtype and tau.dtype == torch.float32
    torch.testing.assert_close(tau, tau_ref, **tau_tol)
    torch.testing.assert_close(p, p_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(dz, dz_ref, atol=atol, rtol=rtol)
    if dk is not None:
        torch.testing.assert_close(dk, dk_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference(shape, budget, dtype, atol, rtol):
    _check_kernel(*_kernel_case(shape, budget, dtype), atol, rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("case", ["lengths", "-inf", "strided", "tiles"])
def test_kernel_masking_strides_tiles(case, dtype, atol, rtol):
    """Per-row lengths (incl. 0 and > n), -inf entries, a strided view, and 40 rows of 300
    columns in 128-column tiles (the bisection and the refinements re-read tiles 1 and 2; 32 rows
    a program: two programs, the second with 8 rows), per-row k."""
    shape = (40, 300) if case == "tiles" else (5, 37)
    z, k, lengths, g = _kernel_case(shape, "per-row", dtype, lengths=case in ("lengths", "tiles"),
                                    neg_inf=case in ("-inf", "tiles"), strided=case == "strided", seed=11)
    _check_kernel(z, k, lengths, g, atol, rtol, block_n=128 if case == "tiles" else None)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_kernel_ties_at_kinks(dtype, atol, rtol):
    """Scores on a grid of 1 (rows 0-15) and 1/2 (rows 16-31), with many ties, and integer k: the
    root sits exactly on a kink in rows 10, 11, 13 (z_(k) - z_(k+1) = 1) and 17, 31 (with free
    entries); both implementations keep the entries at the kink out of S."""
    grid = torch.tensor([1.0] * 16 + [2.0] * 16, device=DEVICE)[:, None]
    z = ((_scores((32, 40), torch.float32, seed=31, scale=1.5) * grid).round() / grid).to(dtype)
    k = torch.randint(1, 40, (32,), generator=torch.Generator().manual_seed(32)).float().to(DEVICE)
    tau = sparsek_ref(z, k, return_tau=True)[1]
    on_kink = ((z - tau[:, None] == 0) | (z - tau[:, None] == 1)).any(-1)
    assert on_kink.nonzero().flatten().tolist() == [10, 11, 13, 17, 31]
    _check_kernel(z, k, None, _scores((32, 40), dtype, seed=33), atol, rtol)


def test_kernel_flat_case_and_empty():
    """The kernel finds the flat interval's midpoint (same tau as the reference), exact 0 / 1 and
    zero gradient: on the small example, and on 16 random rows whose 5 largest scores lie > 1 above
    the rest (the interval's right end z_(5) - 1, where the bisection converges, is not exact in
    fp32). Empty inputs launch nothing."""
    z = torch.tensor([[5.0, 4.0, 0.0, 0.0, 0.0, 0.0], [0.3, 3.0, 0.3, -1.0, 3.0, 0.3]], device=DEVICE)
    p, tau = sparsek(z, 2, kernels="triton", return_tau=True)
    torch.testing.assert_close(tau, torch.tensor([1.5, 1.15], device=DEVICE))
    assert torch.equal(p, (z >= 3).float())
    _check_kernel(z, 2, None, torch.randn_like(z), 0, 0)
    gen = torch.Generator().manual_seed(41)
    high = (torch.arange(33)[None, :] < 5).float().expand(16, 33)
    zr = (torch.randn(16, 33, generator=gen) * 0.3 + 3.5 * high - 0.5).gather(
        1, torch.argsort(torch.rand(16, 33, generator=gen), 1)).to(DEVICE)
    top2 = zr.topk(6, dim=1).values
    assert torch.all(top2[:, 4] - top2[:, 5] > 1.2)
    p, tau = sparsek(zr, 5, kernels="triton", return_tau=True)
    torch.testing.assert_close(tau, (top2[:, 5] + top2[:, 4] - 1) * 0.5, atol=0, rtol=1e-6)
    assert torch.equal(p, (zr >= top2[:, 4:5]).float())
    _check_kernel(zr, 5, None, _scores((16, 33), torch.float32, seed=42), 0, 0)
    assert sparsek(z[:, :0], 2, kernels="triton").shape == (2, 0)
    assert sparsek(z[:0], 2, kernels="triton").shape == (0, 6)


@pytest.mark.parametrize("shift", [-3e-7, 3e-7])
def test_backward_kink_tolerance(shift):
    """Entries within 64 eps * max(1, |tau|) of a kink count as clipped in both backwards: a tau a
    few ulp off the kink 0.25 (z = 0.25 twice, d ~ 0; z = 1.25, d ~ 1) gives the same dz and dk as
    tau exactly on it (where 0 < d < 1 excludes them), instead of letting the last bit decide."""
    z = torch.tensor([[2.0, 1.25, 0.75, 0.25, 0.25, 0.5, -3.0, 0.9]], device=DEVICE)
    g = _scores((1, 8), torch.float32, seed=43)
    on_kink = torch.tensor([0.25], device=DEVICE)
    expect_dz, expect_dk = _backward_ref(z, on_kink, None, g)
    assert torch.count_nonzero(expect_dz) == 3  # S = {0.75, 0.5, 0.9}
    for backward in (_backward_ref, _backward_triton):
        args = (None,) if backward is _backward_triton else ()
        dz, dk = backward(z, on_kink + shift, None, g, *args)
        torch.testing.assert_close(dz, expect_dz, atol=1e-6, rtol=0)
        torch.testing.assert_close(dk, expect_dk, atol=1e-6, rtol=0)


def test_auto_is_reference_on_cpu():
    """kernels="auto" runs the torch reference without CUDA (the Triton kernels on CUDA)."""
    z = _scores((3, 20), torch.float32)
    p = sparsek(z, 4.5)
    if DEVICE == "cpu":
        assert torch.equal(p, sparsek_ref(z, 4.5))
    else:
        torch.testing.assert_close(p, sparsek_ref(z, 4.5), atol=2e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_full_size(dtype):
    """SparseK's scale: 32 heads x 4 sequences of 32768 scores (8 tiles of 4096), k = 2048, and
    1000 rows of 4097 (n just past one tile) with per-row k and lengths; bf16 included."""
    for shape, budget, lengths in (((4, 32, 32768), 2048, False), ((1000, 4097), "per-row", True)):
        z, k, lens, g = _kernel_case(shape, budget, dtype, lengths=lengths, seed=21)
        atol = 2e-2 if dtype == torch.bfloat16 else 1e-3 if dtype == torch.float16 else 1e-5
        _check_kernel(z, k, lens, g, atol, atol, tau_tol=dict(atol=1e-5, rtol=1e-5))
