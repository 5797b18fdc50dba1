# SPDX-License-Identifier: Apache-2.0
"""Benchmark Radar page scoring + top-k selection against the decode attention it feeds.

On CUDA: Llama-3.1-8B attention (Hq 32, Hkv 8, D 128, bf16, cache block 16). For each
context, batch, projection dim n and estimator (`centred`: keys centred on their page mean,
RadarConfig.center_keys=True, the default; `paper`: the paper's estimator, no means) it times
  score   - radar_page_scores (fused q-features, Triton) + torch.topk over the shares,
  ref     - the pure-torch path (radar_page_scores_ref) + torch.topk,
  sparse  - sparse_paged_decode over the selected pages + sinks + window (--budget tokens),
  dense   - the same kernel with every page selected (dense paged decode),
  summ    - radar_summarize_pages over every page of the batch (a whole prefill's summaries),
and prints the share of a sparse step (score + sparse) that scoring and selection take.
Without CUDA it runs a tiny shape under the Triton interpreter only to show that the code
path works; those timings are meaningless.

    python benchmarks/bench_radar_score.py [--contexts 32768 131072] [--batches 1 32] [--dims 64 128 256]
                                           [--estimators centred paper]
"""

import torch

import common  # noqa: I001 (first: sets TRITON_INTERPRET, sys.path)
from common import bench
from kernels.radar_score import radar_page_scores, radar_page_scores_ref, radar_summarize_pages  # noqa: E402
from kernels.sparse_decode import sparse_paged_decode  # noqa: E402


def main():
    parser = common.make_parser(__doc__)
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256], help="projection dims n")
    parser.add_argument("--estimators", nargs="+", choices=["centred", "paper"], default=["centred", "paper"],
                        help="centred: page means (center_keys, the default); paper: no means")
    parser.add_argument("--budget", type=int, default=2048, help="attended tokens incl. sinks and window")
    parser.add_argument("--sinks", type=int, default=64)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--no-ref", action="store_true", help="skip the torch reference path")
    args = parser.parse_args()

    hq, hkv, d, page = common.LLAMA_8B
    use_cuda, device, dtype = common.pick_device(hq, hkv, d, page)
    if not use_cuda:  # tiny fp16 shape: bf16 tl.dot is wrong in the interpreter (sparse decode)
        hq, hkv, d, args.contexts, args.batches, args.dims = 4, 2, 64, [512], [2], [64]
        args.budget, args.sinks, args.window = 256, 16, 16
        common.cpu_notice()
    scale = d ** -0.5
    header = (f"{'context':>8} {'batch':>5} {'n':>4} {'est':>7} {'k':>4} {'score ms':>9} {'ref ms':>8} {'x ref':>6} "
              f"{'sparse ms':>9} {'dense ms':>9} {'score %':>8} {'x dense':>8} {'summ ms':>8}")
    print(header)
    print("-" * len(header))
    for context in args.contexts:
        for batch in args.batches:
            kv_cache, block_table = common.paged_cache(batch, context, hkv, d, page, dtype, device)
            pages = block_table.shape[1]
            query = torch.randn(batch, hq, d, dtype=dtype, device=device)
            seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
            # candidates: full pages before the window; k pages fill the budget beside sinks and window
            cand = (context - args.window) // page
            num_pages = torch.full((batch,), cand, dtype=torch.int32, device=device)
            k = min((args.budget - args.sinks - args.window) // page, cand)
            all_pages = common.all_pages(batch, hkv, pages, device)
            dense_ms = bench(lambda: sparse_paged_decode(query, kv_cache, block_table, seq_lens, all_pages, "page",
                                                         args.sinks, args.window), use_cuda)
            del all_pages
            for n, est in ((n, est) for n in args.dims for est in args.estimators):
                projection = torch.randn(d, n, device=device)
                summaries = torch.zeros(batch * pages, hkv, 2 * n, device=device)
                page_max = torch.full((batch * pages, hkv), float("-inf"), device=device)
                means = torch.zeros(batch * pages, hkv, d, device=device) if est == "centred" else None
                blocks = torch.arange(batch * pages, device=device)
                summ_ms = bench(lambda: radar_summarize_pages(kv_cache, blocks, projection, scale, summaries,
                                                              page_max, means=means), use_cuda)
                score_args = (query, summaries, page_max, block_table, num_pages, projection, scale)

                def score():  # max_pages given: no host sync
                    return radar_page_scores(*score_args, max_pages=cand, means=means).topk(k, dim=-1).indices

                def score_ref():
                    return radar_page_scores_ref(*score_args, max_pages=cand, means=means).topk(k, dim=-1).indices

                score_ms = bench(score, use_cuda)
                ref_ms = float("nan") if args.no_ref else bench(score_ref, use_cuda)
                selected = score().to(torch.int32)
                sparse_ms = bench(lambda: sparse_paged_decode(query, kv_cache, block_table, seq_lens, selected, "page",
                                                              args.sinks, args.window), use_cuda)
                step = score_ms + sparse_ms
                print(f"{context:>8} {batch:>5} {n:>4} {est:>7} {k:>4} {score_ms:>9.4f} {ref_ms:>8.4f} "
                      f"{ref_ms / score_ms:>6.2f} {sparse_ms:>9.4f} {dense_ms:>9.4f} {100 * score_ms / step:>7.1f}% "
                      f"{dense_ms / step:>8.2f} {summ_ms:>8.3f}")
                del summaries, page_max, means, selected
            del kv_cache, block_table, query
            if use_cuda:
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
