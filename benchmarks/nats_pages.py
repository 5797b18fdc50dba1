# SPDX-License-Identifier: Apache-2.0
"""How much of NAtS's token-level eviction can free whole KV pages.

    python benchmarks/nats_pages.py [--context 1792] [--gates configs/nats/...safetensors]

vLLM's paged cache has one block table per request for every layer and KV head of a
KV-cache group, so a page returns to the pool only when every (layer, KV head) stream has
evicted every token in it. This runs SmolLM2-135M in Hugging Face transformers with the NAtS
rule at hard types (the independent oracle of tests/hf_nats.py) over one window of
CPython's pydoc text, then prints, at the window's end:

* the token-level kept share per stream (mean, min, max; what BENCHMARKS.md's "KV kept" is),
* the streams that keep most of the context,
* how many pages of 16 and 32 tokens every stream has evicted (what eviction can free),
* per 32-token page, how many streams still keep one of its tokens.
"""

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import hf_nats  # noqa: E402
from vllm_sparse.models import long_text, smollm2_dir  # noqa: E402
from vllm_sparse.nats import gates as G  # noqa: E402

GATES = ROOT / "configs" / "nats" / "smollm2-135m-instruct.safetensors"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=1792, help="window length in tokens")
    p.add_argument("--gates", default=str(GATES))
    p.add_argument("--start", type=int, default=0, help="character offset into the text")
    args = p.parse_args()

    from transformers import AutoTokenizer

    model = str(smollm2_dir())
    gates = G.NatsGates.load(args.gates)
    text = long_text()[args.start:args.start + 8 * args.context]
    ids = AutoTokenizer.from_pretrained(model)(text)["input_ids"][: args.context]
    _, oracle = hf_nats.score(model, gates, ids[:-4], ids[-4:])   # teacher-forced, 4 steps
    size, window = gates.chunk_size, gates.window
    evicted = torch.stack([G.evictable(types, size, window, args.context)
                           .repeat_interleave(size, dim=1)
                           for _, types in sorted(oracle.types.items())])     # [L, Hkv, T]
    kept = 1 - evicted.float().mean(-1)                                        # [L, Hkv]
    print(f"{args.context}-token window, chunk {size}, window {window}, "
          f"{kept.numel()} (layer, KV head) streams")
    print(f"token-level kept share: mean {kept.mean():.3f}, min {kept.min():.3f}, "
          f"max {kept.max():.3f}")
    many = [(layer, head, round(float(kept[layer, head]), 3))
            for layer, head in (kept > 0.6).nonzero().tolist()]
    print(f"streams keeping more than 60% (layer, head, share): {many}")
    every = evicted.all(0).all(0)                                              # [T]
    for block in (16, 32):
        pages = every.shape[0] // block
        free = int(every[: pages * block].view(pages, block).all(1).sum())
        print(f"{block}-token pages every stream evicted: {free} of {pages}")
    pages = evicted.shape[-1] // 32
    keepers = (~evicted[..., : pages * 32].unflatten(-1, (pages, 32)).all(-1)).sum((0, 1))
    print(f"streams keeping a token of a 32-token page: median {keepers.median()}, "
          f"min {keepers.min()}, max {keepers.max()}")


if __name__ == "__main__":
    main()
