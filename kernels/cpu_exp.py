# SPDX-License-Identifier: Apache-2.0
"""exp over a float32 buffer for the Numba CPU kernels, in loops LLVM vectorises.

Numba compiles ``math.exp`` to a call of libm's scalar ``expf`` (there is no vector math
library here), one call per element: in the decode kernel's online softmax and in Radar's
selection (query features, page softmax) these calls were the largest single cost.

``exp_shifted(x, num, shift, bits)`` sets ``x[:num] = exp(x[:num] - shift)``, meant for
``x <= shift`` (softmax numerators). exp(y) = exp(r) * 2^k with k = round(y / ln 2) and
r = y - k ln 2 in [-ln2/2, ln2/2] (ln 2 split in two, Cody-Waite, so k ln 2 is exact);
exp(r) by Cephes' degree-7 polynomial (the one of its expf), 2^k written into the exponent
bits of ``bits`` (int32 scratch of at least ``num``, read back as float32). Relative error
below 3e-7 (tests/kernels/test_cpu_exp.py). Arguments below -87 (where 2^k would leave
float32's normal range) give exactly 0: the true value, under 1.7e-38, adds nothing to a
sum that holds the shift's own 1. Reference: ``torch.exp``.
"""

import numba
import numpy as np

from .numba_setup import FASTMATH

_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_LOWEST = np.float32(-87.0)


@numba.njit(fastmath=FASTMATH, cache=True, nogil=True)
def exp_shifted(x, num, shift, bits):
    """x[:num] = exp(x[:num] - shift) in place (module docstring); x float32 [>= num],
    bits int32 [>= num] scratch."""
    scale = bits[:num].view(np.float32)
    for i in range(num):
        y = x[i] - shift
        keep = y >= _LOWEST
        y = max(y, _LOWEST)
        k = np.floor(y * _LOG2E + np.float32(0.5))
        r = y - k * _LN2_HI - k * _LN2_LO
        p = np.float32(1.9875691500e-4)
        p = p * r + np.float32(1.3981999507e-3)
        p = p * r + np.float32(8.3334519073e-3)
        p = p * r + np.float32(4.1665795894e-2)
        p = p * r + np.float32(1.6666665459e-1)
        p = p * r + np.float32(5.0000001201e-1)
        x[i] = p * r * r + r + np.float32(1.0)
        bits[i] = ((np.int32(k) + np.int32(127)) << np.int32(23)) if keep else np.int32(0)
    for i in range(num):
        x[i] *= scale[i]
