# SPDX-License-Identifier: Apache-2.0
"""Every Numba kernel module applies kernels/numba_setup.py on import, alone in a fresh
process: vLLM 0.32's CPU worker start scans loaded modules with `vars(value).get("kernel")`,
and llvmlite's `ffi.lib` (loaded by Numba) breaks that scan unless numba_setup patched it, so
an engine started after importing an unpatched module fails (seen: importing the SparseK
decode kernel before `LLM(...)` raised AttributeError in `register_triton_kernel_overrides`)."""

import subprocess
import sys
from pathlib import Path

import pytest

KERNELS = sorted(p.stem for p in (Path(__file__).parents[2] / "kernels").glob("cpu_*.py"))


def test_kernel_modules_found():
    assert {"cpu_sparse_decode", "cpu_sparsek_admit", "cpu_sparsek_rule"} <= set(KERNELS)


@pytest.mark.parametrize("module", KERNELS)
def test_import_alone_keeps_vllm_scan_working(module):
    code = (f"import vllm_sparse.kernels.{module}\n"
            "from llvmlite.binding import ffi\n"
            "assert vars(ffi.lib).get('kernel') is None\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
