# SPDX-License-Identifier: Apache-2.0
"""Per-model YAML files, shipped as package data (see vllm_sparse/config.py)."""
