# SPDX-License-Identifier: Apache-2.0
"""Benchmark dense paged decode with per-token score capture (Recycled Attention full step).

On CUDA: Llama-3.1-8B attention (Hq 32, Hkv 8, D 128, bf16, cache block 16). For each
context and batch it times
  scores - decode_with_scores (output + scores [B, Hkv, T] fp32),
  dense  - sparse_paged_decode with every page selected (dense paged decode, no scores),
  sdpa   - torch SDPA (flash backend) on contiguous K/V of the same shape (no scores),
and prints times and the overhead of capturing scores (scores / dense, scores / sdpa).
Without CUDA it runs a tiny shape under the Triton interpreter only to show that the code
path works; those timings are meaningless.

    python benchmarks/bench_score_capture.py [--contexts 32768 131072] [--batches 1 32]
"""

import torch

import common  # noqa: I001 (first: sets TRITON_INTERPRET, sys.path)
from common import bench, make_decode_case
from kernels.score_capture import decode_with_scores  # noqa: E402
from kernels.sparse_decode import sparse_paged_decode  # noqa: E402


def main():
    parser = common.make_parser(__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--num-splits", type=int, default=None, help="default: launcher heuristic")
    args = parser.parse_args()

    hq, hkv, d, page = common.LLAMA_8B
    use_cuda, device, dtype = common.pick_device(hq, hkv, d, page)
    if not use_cuda:  # tiny fp16 shape: bf16 tl.dot is wrong in the interpreter
        hq, hkv, args.contexts, args.batches = 4, 2, [512], [2]
        common.cpu_notice()
    elem = torch.tensor([], dtype=dtype).element_size()
    kw = dict(num_splits=args.num_splits)

    header = (f"{'context':>8} {'batch':>5} {'scores ms':>10} {'dense ms':>9} {'sdpa ms':>8} "
              f"{'/ dense':>8} {'/ sdpa':>7} {'GB/s':>7}")
    print(header)
    print("-" * len(header))
    for context in args.contexts:
        for batch in args.batches:
            query, kv_cache, block_table, seq_lens = make_decode_case(batch, context, hq, hkv, d, page, dtype, device)
            n_pages = block_table.shape[1]
            all_pages = common.all_pages(batch, hkv, n_pages, device)
            dense_ms = bench(lambda: sparse_paged_decode(query, kv_cache, block_table, seq_lens, all_pages, "page",
                                                         **kw), use_cuda)
            out = torch.empty_like(query)
            scores = torch.empty(batch, hkv, n_pages * page, dtype=torch.float32, device=device)
            scores_ms = bench(lambda: decode_with_scores(query, kv_cache, block_table, seq_lens, out=out,
                                                         scores_out=scores, **kw), use_cuda)
            sdpa, k, v = common.decode_sdpa(query, hkv, context, use_cuda)
            sdpa_ms = bench(sdpa, use_cuda)
            # Bytes that must move: K/V once, the fp32 logits scratch written + read, the scores written.
            nbytes = batch * context * (hkv * 2 * d * elem + 2 * hq * 4 + hkv * 4)
            print(f"{context:>8} {batch:>5} {scores_ms:>10.4f} {dense_ms:>9.4f} {sdpa_ms:>8.4f} "
                  f"{scores_ms / dense_ms:>8.2f} {scores_ms / sdpa_ms:>7.2f} {nbytes / scores_ms / 1e6:>7.1f}")
            del query, kv_cache, block_table, all_pages, out, scores, k, v
            if use_cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
