# SPDX-License-Identifier: Apache-2.0
"""The registration hooks, and a tripwire on the two vLLM functions the plugin wraps."""

import inspect

import pytest
import torch


def test_register_is_idempotent_and_adds_our_names():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E

    from vllm_sparse.plugin import BACKEND_PATHS, CUSTOM_PATH, register

    register()
    register()
    for name, path in BACKEND_PATHS.items():
        assert E[name].get_path() == path
    assert E.CUSTOM.get_path() == CUSTOM_PATH


def test_wrapped_cpu_functions_have_not_changed_upstream():
    """If vLLM changes these, the CPU patch must be re-checked: this test then fails."""
    from vllm.platforms.cpu import CpuPlatform

    select = inspect.getsource(CpuPlatform.get_attn_backend_cls.__wrapped_original__)
    assert "return AttentionBackendEnum.CPU_ATTN.get_path()" in select
    assert 'logger.info("Cannot use %s backend on CPU.", selected_backend)' in select
    update = inspect.getsource(CpuPlatform.check_and_update_config.__wrapped_original__)
    assert "elif not cache_config.user_specified_block_size:\n            cache_config.block_size = 128" in update


def test_cpu_selection_honours_only_our_names():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E
    from vllm.v1.attention.selector import AttentionSelectorConfig

    import vllm_sparse  # noqa: F401

    cfg = AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto",
                                  block_size=32)
    assert CpuPlatform.get_attn_backend_cls(E["RADAR"], cfg) == "vllm_sparse.backend.RadarBackend"
    assert CpuPlatform.get_attn_backend_cls(E.FLASH_ATTN, cfg) == E.CPU_ATTN.get_path()
    assert CpuPlatform.get_attn_backend_cls(None, cfg) == E.CPU_ATTN.get_path()


@pytest.mark.parametrize("kwargs, message", [
    ({"head_size": 72}, "head_size=72 not supported (supported: [32, 64, 80"),
    ({"dtype": torch.float64}, "dtype=torch.float64 not supported (supported: ['torch.float16'"),
    ({"block_size": 24}, "block_size=24 not supported (supported: multiples of 16)"),
    ({"kv_cache_dtype": "fp8"}, "kv_cache_dtype='fp8' not supported"),
])
def test_unsupported_configuration_is_named(kwargs, message):
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E
    from vllm.v1.attention.selector import AttentionSelectorConfig

    import vllm_sparse  # noqa: F401

    args = dict(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=32) | kwargs
    with pytest.raises(ValueError, match=r"RADAR is not valid") as info:
        CpuPlatform.get_attn_backend_cls(E["RADAR"], AttentionSelectorConfig(**args))
    assert message in str(info.value)
