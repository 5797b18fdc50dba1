# SPDX-License-Identifier: Apache-2.0
"""vllm-sparse: sparse-attention backends for vLLM's paged KV cache.

Importing this package registers the backend names with vLLM (as the
`vllm.general_plugins` entry point also does in every vLLM process), so that
`LLM(..., attention_config={"backend": "radar"})` validates.
"""

__version__ = "0.1.0"

try:
    import vllm  # noqa: F401
except ImportError:  # the config schema and the kernels work without vLLM
    pass
else:
    from vllm_sparse.plugin import register

    register()
