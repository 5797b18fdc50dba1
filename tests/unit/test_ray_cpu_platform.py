# SPDX-License-Identifier: Apache-2.0
"""The opt-in Ray CPU platform: chosen only with `VLLM_SPARSE_CPU_RAY=1`, and a tripwire on
the vLLM Ray code it relies on (Ray itself is not needed here)."""

import importlib.util
import inspect

import pytest

from vllm_sparse.ray_cpu_platform import ENV_VAR


@pytest.fixture
def clean_env(monkeypatch):
    for name in (ENV_VAR, "VLLM_TARGET_DEVICE", "VLLM_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_default_cpu_platform_is_unchanged(clean_env):
    from vllm.platforms import resolve_current_platform_cls_qualname

    from vllm_sparse.ray_cpu_platform import cpu_ray_platform

    assert cpu_ray_platform() is None
    clean_env.setenv(ENV_VAR, "0")
    assert cpu_ray_platform() is None
    assert resolve_current_platform_cls_qualname() == "vllm.platforms.cpu.CpuPlatform"


def test_opt_in_selects_ray_cpu_platform(clean_env):
    from vllm.platforms import resolve_current_platform_cls_qualname

    clean_env.setenv(ENV_VAR, "1")
    path = "vllm_sparse.ray_cpu_platform.RayCpuPlatform"
    assert resolve_current_platform_cls_qualname() == path
    clean_env.setenv("VLLM_TARGET_DEVICE", "cpu")  # vLLM then skips platform plugins
    assert resolve_current_platform_cls_qualname() == "vllm.platforms.cpu.CpuPlatform"


def test_ray_cpu_platform_is_the_cpu_platform_with_a_ray_slot():
    import torch
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from vllm_sparse.ray_cpu_platform import RayCpuPlatform

    platform = RayCpuPlatform()
    assert platform.is_cpu() and platform.device_type == "cpu" and platform.dist_backend == "gloo"
    assert CpuPlatform.ray_device_key == "" and platform.ray_device_key == "GPU"
    assert platform.ray_noset_device_env_vars == [ENV_VAR]  # carries the opt-in to actors
    cfg = AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto",
                                  block_size=32)   # the plugin's CPU selection is inherited
    radar = RayCpuPlatform.get_attn_backend_cls(E["RADAR"], cfg)
    assert radar == "vllm_sparse.backend.RadarBackend"


@pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                    reason="vLLM's Ray executor module needs ray (pip install ray)")
def test_vllm_ray_code_relied_on_has_not_changed_upstream():
    """If vLLM changes these, re-check `ray_cpu_platform.py`: this test then fails."""
    from vllm.v1.executor import ray_executor, ray_executor_v2, ray_utils

    proc = inspect.getsource(ray_executor_v2.RayWorkerProc.get_node_and_physical_gpu_ids)
    assert "get_accelerator_ids()[device_key]" in proc
    runtime_env = inspect.getsource(ray_executor_v2.RayExecutorV2._build_runtime_env)
    noset = "current_platform.ray_noset_device_env_vars"
    assert f'env_vars.update({{v: "1" for v in {noset}}})' in runtime_env
    resources = inspect.getsource(ray_executor_v2.RayExecutorV2._get_actor_resource_kwargs)
    assert 'if device_key == "GPU":\n            return {"num_gpus": num_devices}' in resources
    legacy = inspect.getsource(ray_executor.RayDistributedExecutor._update_noset_device_env_vars)
    assert f'{{env_var: "1" for env_var in {noset}}}' in legacy
    cluster = inspect.getsource(ray_utils.initialize_ray_cluster)
    assert "{device_str: 1.0} for _ in range(parallel_config.world_size)" in cluster
