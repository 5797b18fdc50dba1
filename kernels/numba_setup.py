# SPDX-License-Identifier: Apache-2.0
"""Numba set-up shared by the CPU kernels: fast-math flags, threads, one clash with vLLM.

* FASTMATH: reassociation and contraction (so reductions over the head dimension
  vectorise), but not `fastmath=True`'s no-NaN / no-inf promises: the kernels start
  online softmaxes at -inf and meet -inf logits (unsummarised pages).

* Threads: the kernels run on as many threads as torch uses (vLLM's CPU worker sets
  torch's count from its core binding), on Numba's `omp` layer first (then `workqueue`)
  unless the user chose (`NUMBA_THREADING_LAYER` or `NUMBA_THREADING_LAYER_PRIORITY`).
  Numba's OpenMP pool resolves `GOMP_parallel` to the libgomp torch loaded first
  (globally), so torch and the kernels share one set of OpenMP threads. The `workqueue`
  layer starts threads of its own beside torch's spinning OpenMP workers: four busy
  threads on the 2-core CI machine, and a SmolLM2 decode step with Radar at 4K context,
  batch 8, took 181-202 ms instead of 108 ms (omp).
  Numba's `tbb` layer, which Numba's "default" prefers when installed, would do the same.
  GNU OpenMP is not fork-safe: a process forked after a kernel ran stops at its first
  kernel with Numba's "fork() called from a process already using GNU OpenMP" message.
  vLLM's CPU platform starts its engine and workers with `spawn`, and Ray execs its
  workers, so this does not arise in vLLM. The layer is fixed at Numba's first
  parallel launch.
* vLLM 0.32's CPU worker start (`register_triton_kernel_overrides`) scans every loaded
  module's attributes with `vars(value).get("kernel")`. llvmlite's `binding.ffi.lib`
  answers any attribute, `__dict__` included, with a ctypes wrapper, so the scan raises
  AttributeError in any process that imported Numba before starting an engine (the
  second engine of a test session or of a benchmark). Giving that object an empty
  `__dict__` entry in its own attribute cache makes the scan skip it; llvmlite never
  looks that name up itself.
"""

import os

import numba
import torch
from llvmlite.binding import ffi

# The kernels are compiled with cache=True (seconds once, then loaded from
# kernels/__pycache__). Numba's cache records the module's import name, so import them
# only as `vllm_sparse.kernels.*` (a cache written under another name fails to load).
FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}

if "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ:
    # With THREADING_LAYER "default", Numba takes the first of these that loads.
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]

_fntab = vars(type(ffi.lib)).get("_fntab")     # a slot; absent in other llvmlite versions
if _fntab is not None and isinstance(_fntab.__get__(ffi.lib), dict):
    _fntab.__get__(ffi.lib).setdefault("__dict__", {})


def match_torch_threads() -> None:
    """Run the next Numba kernel on as many threads as torch uses, leaving torch's count as
    it was: Numba's omp layer, starting its pool (on the first call here), sets the shared
    libgomp's thread count to NUMBA_NUM_THREADS, which would change torch's too (1 -> 2 on
    the CI machine; CPU_ATTN then fails its thread-count check). The count is put back
    with torch's own setter, because vLLM's CPU worker replaces `torch.set_num_threads` by
    a no-op after it binds its threads."""
    torch_threads = torch.get_num_threads()
    wanted = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != wanted:
        numba.set_num_threads(wanted)
    if torch.get_num_threads() != torch_threads:
        torch._C.set_num_threads(torch_threads)
