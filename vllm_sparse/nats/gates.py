# SPDX-License-Identifier: Apache-2.0
"""NAtS gates and token types: the contract between training (`vllm_sparse.train`) and
inference (the `nats` backend). Pure torch; every function here is the reference.

Token types are decided per (layer, KV head, chunk of `chunk_size` tokens), once the chunk
is complete, from the chunk's own keys and values as the attention op sees them (keys
after RoPE): features = mean over the chunk's tokens of concat(k, v) [2D], logits =
features @ weight[h].T + bias[h] [3], type = argmax, the first chunk forced Global. The
paper's gate reads the layer input (hidden states); vLLM's attention op only sees q, k, v,
so this variant is computable inside it, in training (a transformers attention function)
and in inference alike.

Visibility of a token in complete chunk c (tokens [c*C, (c+1)*C), end e(c) = (c+1)*C - 1)
to a query at position m >= the token (causal):
  GLOBAL  always;
  LOCAL   m <= e(g) where g is the first GLOBAL chunk after c (always, if none yet);
  SLIDING m <= e(c) + window.
Tokens of the incomplete last chunk are visible causally. A token that is invisible to the
query at position m is invisible to every later query, so it can be evicted.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vllm_sparse.eviction.weights import PerKVHeadWeights

GLOBAL, LOCAL, SLIDING = 0, 1, 2
TYPE_NAMES = ("global", "local", "sliding")
FORMAT = "vllm_sparse.nats.gates/1"


@dataclass
class NatsGates(PerKVHeadWeights):
    """Gate weights of one model.

    weight: [L, Hkv, 3, 2D] float32 (features are concat(k, v) of one KV head, D = head
    size); bias: [L, Hkv, 3]; chunk_size: tokens per type decision (a multiple of the KV
    block size); window: SLIDING lifetime in tokens past the chunk's end; meta: free-form
    (training command, wall time, data, kept fraction, ...), saved as JSON.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    chunk_size: int
    window: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.weight.dim() != 4 or self.weight.shape[2] != 3:
            raise ValueError(f"NAtS gates: weight must be [layers, kv_heads, 3, 2*head_size], "
                             f"got {tuple(self.weight.shape)}")
        if self.bias.shape != self.weight.shape[:3]:
            raise ValueError(f"NAtS gates: bias {tuple(self.bias.shape)} does not match weight "
                             f"{tuple(self.weight.shape)}")
        if self.chunk_size < 1 or self.chunk_size % 16:
            raise ValueError(f"NAtS gates: chunk_size={self.chunk_size}; allowed: positive "
                             "multiples of 16 (the KV block size)")
        if self.window < 0:
            raise ValueError(f"NAtS gates: window={self.window}; allowed: >= 0")

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [Hkv, 3, 2D], bias [Hkv, 3]) of one layer."""
        return self.weight[index], self.bias[index]

    def save(self, path: str | Path) -> None:
        header = {"format": FORMAT, "chunk_size": str(self.chunk_size),
                  "window": str(self.window), "meta": json.dumps(self.meta)}
        save_file({"weight": self.weight.float().contiguous(),
                   "bias": self.bias.float().contiguous()}, str(path), metadata=header)

    @classmethod
    def load(cls, path: str | Path) -> "NatsGates":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
        if header.get("format") != FORMAT:
            raise ValueError(f"NAtS gates: {path} has format {header.get('format')!r}; "
                             f"expected {FORMAT!r}")
        tensors = load_file(str(path))
        return cls(tensors["weight"], tensors["bias"], int(header["chunk_size"]),
                   int(header["window"]), json.loads(header.get("meta", "{}")))

    @classmethod
    def constant(cls, num_layers: int, num_kv_heads: int, head_size: int, chunk_size: int,
                 window: int, kind: int = GLOBAL) -> "NatsGates":
        """Gates that give every chunk the type `kind` (GLOBAL: dense attention)."""
        bias = torch.zeros(num_layers, num_kv_heads, 3)
        bias[..., kind] = 1.0
        return cls(torch.zeros(num_layers, num_kv_heads, 3, 2 * head_size), bias,
                   chunk_size, window, {"constant": TYPE_NAMES[kind]})


def chunk_features(key: torch.Tensor, value: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """key, value [Hkv, N, D] with N a multiple of chunk_size -> [Hkv, N // C, 2D] float32."""
    heads, n, d = key.shape
    if n % chunk_size:
        raise ValueError(f"chunk_features: {n} tokens is not a multiple of chunk_size={chunk_size}")
    kv = torch.cat([key, value], dim=-1).float()
    return kv.view(heads, n // chunk_size, chunk_size, 2 * d).mean(dim=2)


def gate_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """features [Hkv, n, 2D], weight [Hkv, 3, 2D], bias [Hkv, 3] -> logits [Hkv, n, 3]."""
    return torch.einsum("hnf,htf->hnt", features, weight.to(features.dtype)) + bias[:, None, :]


def chunk_types(logits: torch.Tensor, first_chunk: int = 0) -> torch.Tensor:
    """logits [Hkv, n, 3] of chunks first_chunk.. -> types [Hkv, n] int8; chunk 0 is GLOBAL."""
    types = logits.argmax(dim=-1).to(torch.int8)
    if first_chunk == 0 and types.shape[1]:
        types[:, 0] = GLOBAL
    return types


def _lifetime_end(types: torch.Tensor, chunk_size: int, window: int) -> torch.Tensor:
    """types [Hkv, n] -> [Hkv, n] int64: last query position that sees each chunk
    (a large value for 'forever')."""
    heads, n = types.shape
    forever = torch.iinfo(torch.int64).max // 2
    ends = (torch.arange(n, device=types.device) + 1) * chunk_size - 1
    # first GLOBAL chunk strictly after c: reverse cumulative min over GLOBAL chunk indices
    idx = torch.where(types == GLOBAL, torch.arange(n, device=types.device), n)
    nxt = torch.cat([idx[:, 1:], torch.full((heads, 1), n, device=types.device)], dim=1)
    nxt = torch.flip(torch.cummin(torch.flip(nxt, [1]), dim=1).values, [1])
    local_end = torch.where(nxt < n, (nxt + 1) * chunk_size - 1, forever)
    life = torch.full((heads, n), forever, dtype=torch.long, device=types.device)
    life = torch.where(types == LOCAL, local_end, life)
    life = torch.where(types == SLIDING, (ends + window).expand(heads, n), life)
    return life


def visible(types: torch.Tensor, chunk_size: int, window: int, query_pos: torch.Tensor,
            kv_len: int) -> torch.Tensor:
    """Mask of what each query attends.

    types [Hkv, n] of the complete chunks (n * C <= kv_len), query_pos [Q] positions
    (< kv_len) -> [Hkv, Q, kv_len] bool: causal, and the type rules above for tokens of
    complete chunks.
    """
    heads, n = types.shape
    tokens = torch.arange(kv_len, device=types.device)
    causal = tokens[None, :] <= query_pos[:, None]                                 # [Q, K]
    life = torch.full((heads, kv_len), torch.iinfo(torch.int64).max // 2,
                      dtype=torch.long, device=types.device)
    life[:, : n * chunk_size] = _lifetime_end(types, chunk_size, window).repeat_interleave(
        chunk_size, dim=1)
    return causal[None] & (query_pos[None, :, None] <= life[:, None, :])


def evictable(types: torch.Tensor, chunk_size: int, window: int, next_pos: int) -> torch.Tensor:
    """types [Hkv, n] -> [Hkv, n] bool: chunks no query at position >= next_pos attends."""
    return _lifetime_end(types, chunk_size, window) < next_pos


def type_lifetimes(types: torch.Tensor, chunk_size: int, window: int) -> torch.Tensor:
    """types [Hkv, n] -> [Hkv, n, 3] int64: the last query position that would see chunk c
    if c had type t (index GLOBAL/LOCAL/SLIDING), the other chunks keeping their types.
    At t = types[h, c] this is `_lifetime_end`; training mixes the three with soft weights."""
    heads, n = types.shape
    forever = torch.iinfo(torch.int64).max // 2
    ends = (torch.arange(n, device=types.device) + 1) * chunk_size - 1
    idx = torch.where(types == GLOBAL, torch.arange(n, device=types.device), n)
    nxt = torch.cat([idx[:, 1:], torch.full((heads, 1), n, device=types.device)], dim=1)[:, :n]
    nxt = torch.flip(torch.cummin(torch.flip(nxt, [1]), dim=1).values, [1])
    local_end = torch.where(nxt < n, (nxt + 1) * chunk_size - 1, forever)
    return torch.stack([torch.full_like(local_end, forever), local_end,
                        (ends + window).expand(heads, n)], dim=-1)


def kept_fraction(types: torch.Tensor, chunk_size: int, window: int, kv_len: int) -> torch.Tensor:
    """types [Hkv, n] of the complete chunks of a kv_len-token sequence -> [Hkv] float32:
    the fraction of the kv_len tokens still live (visible) at the last position kv_len - 1."""
    last = torch.tensor([kv_len - 1], device=types.device)
    return visible(types, chunk_size, window, last, kv_len)[:, 0].float().mean(dim=-1)
