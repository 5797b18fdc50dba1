# SPDX-License-Identifier: Apache-2.0
"""Numba set-up shared by the CPU kernels: fast-math flags, threads, one clash with vLLM.

* FASTMATH: reassociation and contraction (so reductions over the head dimension
  vectorise), but not `fastmath=True`'s no-NaN / no-inf promises: the kernels start
  online softmaxes at -inf and meet -inf logits (unsummarised pages).

* Threads: the kernels run on as many threads as torch uses (vLLM's CPU worker sets
  torch's count from its core binding), on Numba's `workqueue` layer unless the user
  chose one (`NUMBA_THREADING_LAYER`): the default OpenMP layer left torch's next small
  ops about 100x slower on the 2-core CI machine (a 20 us `torch.exp` took 2 ms after one
  Numba parallel call). The layer is fixed at Numba's first parallel launch.
* vLLM 0.32's CPU worker start (`register_triton_kernel_overrides`) scans every loaded
  module's attributes with `vars(value).get("kernel")`. llvmlite's `binding.ffi.lib`
  answers any attribute, `__dict__` included, with a ctypes wrapper, so the scan raises
  AttributeError in any process that imported Numba before starting an engine (the
  second engine of a test session or of a benchmark). Giving that object an empty
  `__dict__` entry in its own attribute cache makes the scan skip it; llvmlite never
  looks that name up itself.
"""

import numba
import torch
from llvmlite.binding import ffi

# The kernels are compiled with cache=True (seconds once, then loaded from
# kernels/__pycache__). Numba's cache records the module's import name, so import them
# only as `vllm_sparse.kernels.*` (a cache written under another name fails to load).
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}

if numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER = "workqueue"

_fntab = vars(type(ffi.lib)).get("_fntab")     # a slot; absent in other llvmlite versions
if _fntab is not None and isinstance(_fntab.__get__(ffi.lib), dict):
    _fntab.__get__(ffi.lib).setdefault("__dict__", {})


def match_torch_threads() -> None:
    """Run the next Numba kernel on as many threads as torch uses."""
    wanted = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
