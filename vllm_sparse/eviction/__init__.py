# SPDX-License-Identifier: Apache-2.0
"""KV eviction: pages that every KV head of every layer evicted go back to vLLM's free
pool while the request runs. See DESIGN.md in this directory.

- `cache`: `EvictingAttentionSpec` (what an evicting backend's `customize_spec` returns,
  via `evicting_spec`) and `EvictingAttentionManager` (frees the pages; registered with
  vLLM, together with the patch, when the module is imported);
- `channel`: the worker's decisions (`WORKER.expect_block_size`, `WORKER.report`) and their
  application in the scheduler;
- `patch`: the one patch of vLLM that carries them (worker output -> scheduler);
- `streaming`: a StreamingLLM prototype that exercises all of it (tests only);
- `weights`: the shape contract of trained per-KV-head weights (NAtS gates, SparseK scorer).
"""
