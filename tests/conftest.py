# SPDX-License-Identifier: Apache-2.0
"""Environment for every test: offline, small CPU KV cache, in-process engine by default,
Triton's interpreter when there is no GPU (read when kernels are decorated, so it is set
before anything imports them)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from vllm_sparse.models import tiny_llama_dir

    return str(tiny_llama_dir())


@pytest.fixture(scope="session")
def smollm2() -> str:
    from vllm_sparse.models import smollm2_dir

    return str(smollm2_dir())
