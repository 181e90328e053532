"""Tiles for the float GEMV over a small model's narrow weights: gemv.py's SMALL_GEMV_CONFIG and SMALL_HEAD_CONFIG.

    python scripts/small_gemv_sweep.py --model SmolLM2-135M    # about 4 minutes on an H100

A small model's matmuls take a few microseconds each, so their tiles are chosen by latency, not streaming rate. Each
kind of matmul is timed alone, all of a model's layers of that kind as one CUDA graph with what the model fuses
into them (wqkv and the gate-up pair with their RMSNorm, wo and w2 with their residual add; then the output head),
at one row of x (a decode step) and at four (the verify of k = 3 drafts), under the same tile: gemv.py gives both
one tile so that a verify's sums are a decode step's bit for bit. Each kind's tiles are ranked by the sum of the two
times and listed down to the third that sums in one order at 1, 2 and 4 rows (the layout Triton gives the products,
compiled for sm_90; tests/test_gemv.py checks the shipped tiles the same way); only those are usable. Microseconds
per graph.
"""
import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gemv as G  # noqa: E402
from model import ModelArgs  # noqa: E402
from gemv_sweep import graph_time  # noqa: E402  (scripts/ is on the path: this file's folder)
from kernel_resources import gemv_sum_layouts  # noqa: E402

KINDS = ("wqkv", "wo", "w1+w3", "w2", "head")
DEVICE = "cuda"


def layer_calls(c: ModelArgs, rows: int, kind: str) -> list:
    """(x, weight, gate, residual, rms_eps) for every call of one kind of matmul in a model of config c."""
    bf16 = dict(device=DEVICE, dtype=torch.bfloat16)
    d, hidden, qkv = c.dim, c.intermediate_size, (c.n_head + 2 * c.n_local_heads) * c.head_dim
    x, h, res = torch.randn(rows, d, **bf16), torch.randn(rows, hidden, **bf16), torch.randn(rows, d, **bf16)
    w = lambda n, k: 0.02 * torch.randn(n, k, **bf16)  # noqa: E731
    if kind == "head":
        return [(x, w(c.vocab_size, d), None, None, None)]
    one = {"wqkv": lambda: (x, w(qkv, d), None, None, 1e-5), "wo": lambda: (x, w(d, d), None, res, None),
           "w1+w3": lambda: (x, w(hidden, d), w(hidden, d), None, 1e-5),
           "w2": lambda: (h, w(d, hidden), None, res, None)}
    return [one[kind]() for _ in range(c.n_layer)]


def timed(calls: list) -> float:
    f = G.gemv if calls[0][0].shape[0] == 1 else G.gemm_rows
    return graph_time(lambda: [f(x, w, None, g, r, eps) for x, w, g, r, eps in calls]) * 1e6


def shipped_tile(call: tuple) -> dict:
    _, w, g, _, _ = call
    return G.gemv_config(*w.shape, g is not None)


def same_order(calls: list, tile: dict) -> bool:
    """Whether the GEMV under `tile` sums each row in one order at 1, 2 and 4 rows (its layout compiled for sm_90)."""
    _, w, g, r, eps = calls[0]
    return len(set(gemv_sum_layouts(w.shape[1], tile, g is not None, r is not None, eps is not None))) == 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SmolLM2-135M", help="whose layer shapes (a model.py preset name)")
    p.add_argument("--budget", type=float, default=230, help="seconds of timing tiles")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("small_gemv_sweep.py needs a CUDA GPU (it times Triton kernels in CUDA graphs)")
    c = ModelArgs.from_name(args.model)
    torch.manual_seed(0)
    calls = {(rows, kind): layer_calls(c, rows, kind) for rows in (1, 4) for kind in KINDS}
    grid = [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, STAGES=1)
            for n, k, w in itertools.product([2, 1, 4, 8], [1024, 256, 512, 128, 64], [1, 2, 4])]
    # at most 256 float32 products a thread in the 4-row tile with a gate: more spill registers
    grid = [t for t in grid if 8 * t["BLOCK_N"] * t["BLOCK_K"] <= 256 * 32 * t["num_warps"]
            and t["BLOCK_K"] * t["BLOCK_N"] >= 32 * t["num_warps"]]
    shipped = {kind: shipped_tile(calls[1, kind][0]) for kind in KINDS}
    saved, results, t0 = G.gemv_config, [], time.time()
    try:
        for tile in [None] + grid:  # None: the tiles gemv.py ships
            if time.time() - t0 > args.budget:
                break
            if tile is not None:
                G.gemv_config = lambda N, K, gate=False, tile=tile: tile
            t = {kind: (timed(calls[1, kind]), timed(calls[4, kind])) for kind in KINDS}
            results.append((tile, t))
            print(f"{tile or 'shipped'}: " + "  ".join(f"{k} {a:.1f} / {b:.1f}" for k, (a, b) in t.items()), flush=True)
        print(f"\n{len(results) - 1} of {len(grid)} tiles timed; per kind, microseconds at 1 / 4 rows (shipped first)")
        for kind in KINDS:
            a, b = results[0][1][kind]
            print(f"{kind:6s} shipped {shipped[kind]}: {a:.1f} / {b:.1f}")
            ranked, kept = sorted(results[1:], key=lambda r: sum(r[1][kind])), 0
            for tile, t in ranked:  # the fastest tiles down to the third that sums in one order
                exact = same_order(calls[1, kind], tile)
                print(f"       {tile}: {t[kind][0]:.1f} / {t[kind][1]:.1f}  "
                      f"{'one order' if exact else 'SUMS ORDERED DIFFERENTLY at 1 and 4 rows: not usable'}")
                kept += exact
                if kept == 3:
                    break
    finally:
        G.gemv_config = saved


if __name__ == "__main__":
    main()
