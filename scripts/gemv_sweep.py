"""Time gemv.py's Triton kernels (bf16, int8, int4), cuBLAS and torch's int4 kernel (tinygemm) at
1 input row (decode) and 6 (speculative verify) over a model's layer shapes (Llama-2-7B by default) with random
weights, all matmuls of a step replayed as one CUDA graph, against the device-to-device copy bandwidth measured in
the same run. Counts the bytes the quantized weights and their scales occupy. The feed-forward's gate and up
projections run as one call (gemv.py's gate-up pair) for the bf16, int8 and Triton int4 kernels, as in the model,
unless --no_pair; with --norms the Triton kernels also take what they take in the model: the RMSNorm before wqkv and
the gate-up pair, the residual add after wo and w2. --sweep also tries a grid of tile configs for the Triton kernels.

    python scripts/gemv_sweep.py           # under a minute on an H100
    python scripts/gemv_sweep.py --sweep   # about 6 minutes; the best configs go into gemv.py by hand
    python scripts/gemv_sweep.py --sweep bf16 --model SmolLM2-135M --groupsize 64 --rows 1,4 --kinds bf16,bf16-cublas
    python scripts/gemv_sweep.py --kinds int4,int4-mma --rows 1,6 --norms --per_layer [--sweep int4-mma]  # int4 mma
"""
import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gemv as G  # noqa: E402
import quantize as Q  # noqa: E402
from model import ModelArgs  # noqa: E402
from bench import copy_bandwidth  # noqa: E402  (scripts/ is on the path: this file's folder)

MMA_TILES = {"int4-mma": "INT4_MMA_CONFIG", "int4-mma-wide": "INT4_MMA_WIDE_CONFIG",  # gemv.int4_mma_config's tiles
             "int4-mma-gate": "INT4_MMA_GATE_CONFIG", "int4-mma-long": "INT4_MMA_LONG_CONFIG"}


def layer_shapes(model: str) -> list:
    """(N, K) of each linear layer of a model.py preset: wqkv, wo, w1, w3, w2 of every layer in turn."""
    c = ModelArgs.from_name(model)
    d, qkv = c.dim, (c.n_head + 2 * c.n_local_heads) * c.head_dim
    return [(qkv, d), (d, c.n_head * c.head_dim), (c.intermediate_size, d), (c.intermediate_size, d),
            (d, c.intermediate_size)] * c.n_layer


def random_int4(shapes: list, g: int) -> list:
    """Random weights in pack_int4's layout on the GPU, (weight, scales, zeros) for each (N, K), group size g."""
    return [(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda"),
             torch.rand(n, k // g, device="cuda", dtype=torch.bfloat16),
             torch.rand(n, k // g, device="cuda", dtype=torch.bfloat16)) for n, k in shapes]


def graph_time(fn, n=20):
    """Median seconds per replay of fn captured as one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(); fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay(); torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        e0.record()
        for _ in range(n):
            g.replay()
        e1.record(); torch.cuda.synchronize()
        times.append(e0.elapsed_time(e1) / n / 1000)
    return sorted(times)[2]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", nargs="*", default=None, metavar="KIND",
                   help="also sweep the Triton kernels' tile configs (all, or the kinds named: bf16 int8 int4; int8 "
                        "and int4 include the gate-up pair's own tiles, int4 the wide matmuls' too; int8-gate, "
                        "int4-wide and the like alone sweep only that one; int4-mma, with it in --kinds, the "
                        "tensor-core kernel's four tiles)")
    p.add_argument("--model", default="Llama-2-7B", help="whose layer shapes (a model.py preset name)")
    p.add_argument("--groupsize", type=int, default=128, help="int4 group size")
    p.add_argument("--rows", default="1,6", help="input rows to time, comma-separated")
    p.add_argument("--kinds", default="bf16,bf16-cublas,int8,int4,int4-tinygemm", help="kernels to time")
    p.add_argument("--budget", type=float, default=60, help="seconds of sweeping per kernel and row count")
    p.add_argument("--no_pair", action="store_true",
                   help="w1 and w3 as two matmuls (default for bf16, int8 and int4: one call with w1 as w3's gate, "
                        "as the model runs them)")
    p.add_argument("--no_pdl", action="store_true", help="plain launches: no programmatic dependent launch")
    p.add_argument("--per_layer", action="store_true",
                   help="also time each of a layer's matmuls alone (over all layers): which is furthest from copy; "
                        "with --sweep, each config too, and the best config for each matmul")
    p.add_argument("--norms", action="store_true",
                   help="the Triton kernels with the RMSNorm before wqkv and the gate-up pair and the residual add "
                        "after wo and w2, as the model runs them")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gemv_sweep.py needs a CUDA GPU (it times Triton kernels in CUDA graphs)")
    G.PDL_OK = G.PDL_OK and not args.no_pdl
    sweep, g, row_counts = args.sweep, args.groupsize, [int(r) for r in args.rows.split(",")]
    shapes = layer_shapes(args.model)
    torch.manual_seed(0)
    w8 = [(torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda"),
           torch.rand(n, device="cuda", dtype=torch.bfloat16)) for n, k in shapes]
    w4 = random_int4(shapes, g)
    w4m = [(Q.shuffle_int4(Q.unpack_int4(w, g)), s, z) for w, s, z in w4] if "int4-mma" in args.kinds else None
    wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for n, k in shapes]
    nbytes = {"bf16": [w.numel() * 2 for w in wb], "int8": [w.numel() + s.numel() * 2 for w, s in w8],
              "int4": [w.numel() + 2 * s.numel() * 2 for w, s, _ in w4]}
    nbytes["bf16-cublas"], nbytes["int4-tinygemm"], nbytes["int4-mma"] = nbytes["bf16"], nbytes["int4"], nbytes["int4"]
    copy = copy_bandwidth("cuda")  # the same measurement as bench.py's
    x = torch.randn(max(row_counts), max(k for _, k in shapes), device="cuda", dtype=torch.bfloat16)
    norm_w = 1 + 0.1 * torch.randn(x.shape[-1], device="cuda", dtype=torch.bfloat16)
    # one (rows, n) residual a matmul, sliced to the rows timed (the int4-xq sweep runs at fewer than --rows)
    residuals = [torch.randn(max(row_counts), n, device="cuda", dtype=torch.bfloat16) for n, _ in shapes
                 ] if args.norms else None
    print(f"copy {copy:.0f} GB/s", flush=True)

    tiny = [(torch.ops.aten._convert_weight_to_int4pack(w, Q.cuda_inner_k_tiles(k)),
             torch.stack([s, z], -1).transpose(0, 1).contiguous()) for (w, s, z), (_, k) in zip(w4, shapes)]

    def kept(i, part):
        """whether matmul i (index i % 5 of its layer: wqkv, wo, w1, w3, w2) runs when timing `part` of a layer
        (None: all); with the gate-up pair, w1 runs inside w3's call"""
        return part is None or i % 5 == part or (part == 3 and i % 5 == 2 and not args.no_pair)

    def plan(xs, ws, rows, part=None):
        """(x, weight, gate, residual, norm weight) per call: the feed-forward's w3 (index 3 of a layer) takes w1
        (index 2) as its gate; with --norms wqkv, w1 and w3 take a norm, wo and w2 a residual"""
        calls = [(xi, w, None if args.no_pair or i % 5 != 3 else ws[i - 1],
                  residuals[i][:rows] if args.norms and i % 5 in (1, 4) else None,
                  norm_w[:xi.shape[-1]] if args.norms and i % 5 in (0, 2, 3) else None)
                 for i, (xi, w) in enumerate(zip(xs, ws))]
        return [c for i, c in enumerate(calls) if (args.no_pair or i % 5 != 2) and kept(i, part)]

    def run(kind, rows, part=None):
        xs = [x[:rows, :k].contiguous() for _, k in shapes]
        if kind == "bf16":
            f = G.gemv if rows == 1 else G.gemm_rows
            fn = lambda: [f(xi, w, gate=g, residual=r, rms_eps=None if nw is None else 1e-5)  # noqa: E731
                          for xi, w, g, r, nw in plan(xs, wb, rows, part)]
        elif kind == "bf16-cublas":
            fn = lambda: [torch.nn.functional.linear(xi, w)  # noqa: E731
                          for i, (xi, w) in enumerate(zip(xs, wb)) if kept(i, part)]
        elif kind == "int8":
            fn = lambda: [G.int8_gemv(xi, w, s, None, *(g or (None, None)), r, nw, 1e-5)  # noqa: E731
                          for xi, (w, s), g, r, nw in plan(xs, w8, rows, part)]
        elif kind in ("int4", "int4-mma"):  # int4-mma: quantize.shuffle_int4's layout, the tensor cores
            fn = lambda: [G.int4_gemv(xi, w, s, z, g, None, *(gt or (None, None, None)), r, nw, 1e-5)  # noqa: E731
                          for xi, (w, s, z), gt, r, nw in plan(xs, w4 if kind == "int4" else w4m, rows, part)]
        else:
            fn = lambda: [torch.ops.aten._weight_int4pack_mm(xi, w, g, sz)  # noqa: E731
                          for i, (xi, (w, sz)) in enumerate(zip(xs, tiny)) if kept(i, part)]
        return sum(b for i, b in enumerate(nbytes[kind]) if kept(i, part)) / graph_time(fn) / 1e9

    # a layer's matmuls timed alone with --per_layer (w1 runs inside w3's call, as the gate-up pair)
    parts = [part for part in range(5) if part != 2 or args.no_pair] if args.per_layer else []
    names = ["w1+w3" if part == 3 and not args.no_pair else ("wqkv", "wo", "w1", "w3", "w2")[part] for part in parts]
    table = []
    for kind, rows in itertools.product(args.kinds.split(","), row_counts):
        gbs = run(kind, rows)
        table.append(f"{kind:13s} rows={rows} default config       {gbs:7.0f} GB/s {100 * gbs / copy:5.1f}%")
        print(table[-1], flush=True)
        for part, name in zip(parts, names):
            gbs = run(kind, rows, part)
            table.append(f"{kind:13s} rows={rows}   {name:6s} alone       {gbs:7.0f} GB/s {100 * gbs / copy:5.1f}%")
            print(table[-1], flush=True)
    if sweep is None:
        print("\n".join(table))
        return

    def configs(keys, *values):
        return [dict(zip(keys, v)) for v in itertools.product(*values)]
    # one row: STAGES > 1 pipelines the K loop (tl.range's num_stages: loads run that many chunks ahead)
    tile, rows_tile = ["BLOCK_N", "BLOCK_K", "num_warps", "STAGES"], ["BLOCK_N", "BLOCK_K", "num_warps", "num_stages"]
    grids = {("bf16", 1): configs(tile, [2, 4], [256, 512, 1024], [4], [1, 2, 3, 4]),
             ("bf16", 6): configs(rows_tile, [16, 32, 64], [64, 128, 256, 512], [4], [2, 3, 4, 6]),
             ("int8", 1): configs(["BLOCK_N", "BLOCK_W", "num_warps", "STAGES"], [4, 8, 16], [64, 128, 256, 512],
                                  [4, 8], [1, 3]),
             ("int8-gate", 1): configs(["BLOCK_N", "BLOCK_W", "num_warps", "STAGES"], [8, 4, 2], [256, 128, 512],
                                       [4, 8], [1]),
             # int4_config gives a warp at most 128 words (so 4 warps at 512) and STAGES 2-3 ran five times slower
             # for several rows (H100, session 40), so the one-row grid sweeps rows and words only
             ("int4", 1): configs(["BLOCK_N", "BLOCK_W", "num_warps", "STAGES"], [4, 8, 16, 2], [512, 256, 128],
                                  [4], [1]),
             ("int4-gate", 1): configs(["BLOCK_N", "BLOCK_W", "num_warps", "STAGES"], [2, 4, 8], [256, 512],
                                       [4], [1]),
             # int4_config gives a warp at most 128 words: more warps than that would time the same kernel again;
             # STAGES 2 and 3 ran at a fifth of STAGES 1's speed (H100, session 40), so the grid keeps 1
             ("int4-xq", G.INT4_XQ_ROWS): [c for c in configs(["BLOCK_N", "BLOCK_W", "num_warps", "STAGES"], [4, 2, 8],
                                                              [128, 256, 512], [1, 2, 4], [1])
                                           if c["num_warps"] <= c["BLOCK_W"] // 128],
             # the int4 tiles of W with gemv.WIDE_N rows or more (the 7B's wqkv)
             ("int4-wide", 1): [c for c in configs(["BLOCK_N", "BLOCK_W", "num_warps", "STAGES"], [16, 8, 32],
                                                   [128, 256, 512], [1, 2, 4], [1])
                                if c["num_warps"] == c["BLOCK_W"] // 128],
             ("int4-xq-wide", G.INT4_XQ_ROWS): configs(["BLOCK_N", "BLOCK_W", "num_warps", "STAGES"], [8, 4, 16],
                                                       [128, 256], [1], [1]),
             ("int8", 6): configs(rows_tile, [16, 32, 64], [64, 128, 256], [4], [3, 4, 6]),
             # the int4 tensor-core kernel: one tile serves 1..8 rows; each of its four tiles (wo, wqkv, the gate-up
             # pair, w2) swept at one row and at the most rows asked for
             **{(kind, key): configs(["SPLIT", "TPS"], [4, 8, 16], [4, 2, 8, 1])
                for kind in MMA_TILES for key in (1, G.INT4_XQ_ROWS)},
             ("int4", 6): configs(["BLOCK_N", "num_warps", "num_stages"], [32, 16, 64], [4, 2, 8], [6, 4, 3])}
    tiles = {("bf16", 1): "GEMV_CONFIG", ("bf16", 6): "ROWS_CONFIG" if shapes[0][1] >= 4096 else "SMALL_ROWS_CONFIG",
             ("int8", 1): "INT8_CONFIG", ("int8-gate", 1): "INT8_GATE_CONFIG", ("int4", 1): "INT4_CONFIG",
             ("int4-gate", 1): "INT4_GATE_CONFIG", ("int8", 6): "INT8_ROWS_CONFIG", ("int4", 6): "INT4_ROWS_CONFIG",
             ("int4-xq", G.INT4_XQ_ROWS): "INT4_XQ_CONFIG", ("int4-wide", 1): "INT4_WIDE_CONFIG",
             ("int4-xq-wide", G.INT4_XQ_ROWS): "INT4_XQ_WIDE_CONFIG",
             **{(kind, key): name for kind, name in MMA_TILES.items() for key in (1, G.INT4_XQ_ROWS)}}
    for (kind, key), grid in grids.items():
        kind0 = "int4-mma" if kind.startswith("int4-mma") else kind.split("-")[0]  # the layers a tile serves:
        # int8-gate's run is all int8 layers
        skip = sweep and kind0 not in sweep and kind not in sweep  # "int8" takes int8-gate too
        unused = (kind.endswith("-gate") and args.no_pair) or (
            kind.endswith(("-wide", "-mma-gate")) and max(shapes)[0] < G.WIDE_N) or (
            kind0 == "int4-mma" and w4m is None)  # not in --kinds: no shuffled weights made
        if skip or unused or (key == 1 and 1 not in row_counts) or (key > 1 and max(row_counts) < 2):
            continue
        rows = 1 if key == 1 else min(max(row_counts), key) if kind.startswith(("int4-xq", "int4-mma")) else max(
            row_counts)
        if (kind, key) == ("int4", 6) and rows <= G.INT4_XQ_ROWS:
            continue  # these rows take the int4 GEMV (int4-xq), not the tensor-core rows kernel
        t0, res = time.time(), []
        default = dict(getattr(G, tiles[kind, key]))
        for cfg in grid:
            if time.time() - t0 > args.budget:
                break
            setattr(G, tiles[kind, key], dict(default, **cfg))  # keys the grid does not name keep gemv.py's value
            try:
                res.append((tuple(cfg.values()), run(kind0, rows), [run(kind0, rows, part) for part in parts]))
            except Exception as e:  # noqa: BLE001
                print(kind, rows, cfg, "failed", f"{type(e).__name__}: {e}"[:300], flush=True)
        setattr(G, tiles[kind, key], default)
        res.sort(key=lambda r: -r[1])
        head = (f"{kind} rows={rows} {tiles[kind, key]}: {len(res)} of {len(grid)} configs timed in the budget "
                f"({', '.join(grid[0])})")
        best = [f"{kind} rows={rows} {tiles[kind, key]}={str(cfg):18s} {gbs:7.0f} GB/s {100 * gbs / copy:5.1f}%"
                for cfg, gbs, _ in res[:4]]
        shipped = next((r for r in res if r[0] == tuple(default[k] for k in grid[0])), None)
        per_part = []  # each matmul's own best config, and the shipped config's figure if the grid holds it
        for j, name in enumerate(names if res else []):
            cfg, _, per = max(res, key=lambda r: r[2][j])
            per_part.append(f"{kind} rows={rows}   {name:6s} best {str(cfg):18s} {100 * per[j] / copy:5.1f}%"
                            + (f" (shipped {100 * shipped[2][j] / copy:5.1f}%)" if shipped else ""))
        table += [head] + best + per_part
        print("\n".join([head] + best[:1] + per_part), flush=True)
    print("\n".join(table))


if __name__ == "__main__":
    main()
