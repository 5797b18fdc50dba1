# SPDX-License-Identifier: Apache-2.0
"""Tests for the vectorisable exp of the Numba CPU kernels (kernels/cpu_exp.py).

Checked against torch.exp in float64 over the whole range a softmax meets (0 down to
float32's normal limit), at buffer lengths that exercise the vector body and its
remainder, and for what lies below that limit (-inf included): exactly 0."""

import numpy as np
import pytest
import torch

# imported as the engine imports it: Numba's on-disk cache records the module name
from vllm_sparse.kernels.cpu_exp import exp_shifted

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only kernel")
MAX_RELATIVE_ERROR = 4e-7        # Cephes' expf polynomial: about 2 ulp


def _exp_shifted(values: torch.Tensor, shift: float, num: int | None = None) -> torch.Tensor:
    x = values.float().numpy().copy()
    bits = np.full(len(x), -1, np.int32)
    exp_shifted(x, len(x) if num is None else num, np.float32(shift), bits)
    return torch.from_numpy(x)


@pytest.mark.parametrize("length", [1, 7, 32, 1000])
@pytest.mark.parametrize("shift", [0.0, 3.5, -40.0])
def test_matches_torch_exp(length, shift):
    gen = torch.Generator().manual_seed(length)
    y = -87.0 * torch.rand(length, generator=gen, dtype=torch.float64)   # y = x - shift
    y[0] = 0.0                                                            # the max itself
    x = (y + shift).float()
    got = _exp_shifted(x, shift).double()
    # the argument as the kernel forms it (float32 x - shift), then exp in float64
    expected = torch.exp((x - torch.tensor(shift, dtype=torch.float32)).double())
    relative = ((got - expected).abs() / expected).max().item()
    assert relative < MAX_RELATIVE_ERROR, f"relative error {relative:.2e}"
    assert got[0].item() == pytest.approx(1.0, rel=MAX_RELATIVE_ERROR)


def test_below_float32_normal_range_is_zero():
    x = torch.tensor([-87.5, -100.0, -1e30, float("-inf"), -86.9])
    got = _exp_shifted(x, 0.0)
    assert got[:4].tolist() == [0.0] * 4
    assert got[4].item() == pytest.approx(np.exp(-86.9), rel=MAX_RELATIVE_ERROR)


def test_only_the_first_num_elements_change():
    x = torch.tensor([0.0, -1.0, -2.0, 5.0, 6.0])
    got = _exp_shifted(x, 0.0, num=3)
    assert torch.allclose(got[:3], torch.exp(x[:3]), rtol=MAX_RELATIVE_ERROR, atol=0)
    assert got[3:].tolist() == [5.0, 6.0]
