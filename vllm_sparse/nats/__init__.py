# SPDX-License-Identifier: Apache-2.0
"""NAtS (Neural Attention Search): learned per-chunk token types that let the KV cache
evict tokens. `gates` holds the gate format and the pure-torch type rules."""
