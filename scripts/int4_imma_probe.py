"""Times gemv.py's int4 path on the int8 tensor cores (`_int4_xb_kernel`, `_int4_imma_kernel`; off in the model
until timed: `gemv.INT4_IMMA_ROWS`) bare, against the kernels the model runs, at 1, 2, 4, 6 and 8 rows of x.

The XQ GEMV that verification runs over 2..8 rows spends four dp2a a word of 8 weights for every row of x: compiled
for sm_90, 366 loop instructions a KB at 6 rows, 192 of them dp2a (32.6% of copy over the 7B's layers with the
norms, session 41). The tensor-core path rounds x per group onto 15-bit integers (the rounding loses under 2**-14
of the group's largest magnitude, below x's own bfloat16 rounding) and splits each into hi = q >> 7 (-128..127) and
lo = q & 127, both int8, laid out as the dot's second operand, (K, 16): column m the hi part of x's row m, column
8 + m its lo part. W's nibbles q (0..15) are the first operand as int8, two masks of a 32-bit register each, so
D = q . xb is exact in int32, and per group

    acc += D * s * ec + (z - 8 s) * xc,   ec = (128 e for the hi columns, e for the lo), xc = (X e, 0)

with e the group's scale of x and X the sum of its integers; the hi and lo columns are added at the end. Its cost a
KB of weights does not grow with x's rows (up to 8). Checks itself against the dequantized weights, then times it
over a model's layers (one CUDA graph, as scripts/gemv_sweep.py; no norms, w1 and w3 as two matmuls), a sweep of its
tile at 6 rows.

    python scripts/int4_imma_probe.py [MODEL]             # on CUDA
    TRITON_INTERPRET=1 python scripts/int4_imma_probe.py  # on the CPU: the check alone, under Triton's interpreter
    python scripts/int4_imma_probe.py --resources         # any machine: the kernel compiled for sm_90, per tile
"""
import itertools
import os
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gemv as G  # noqa: E402
import quantize as Q  # noqa: E402

CFG = dict(BLOCK_N=128, num_warps=4, num_stages=3)


def imma_gemm(x, w, s, z, gs, cfg=None):
    """x (M <= 8, K) contiguous, K whole groups; pack_int4's weight (N, K/2) uint8, scales and zeros (N, K/g): gemv.py's
    two kernels of the path, launched as int4_gemv launches them (which it does from 2 rows, when switched on)."""
    cfg = cfg or CFG
    (M, K), N = x.shape, w.shape[0]
    xb, ec = torch.empty(K, 16, dtype=torch.int8, device=x.device), torch.empty(2, K // gs, 16, device=x.device)
    G._int4_xb_kernel[(triton.cdiv(K // gs, max(1, 512 // gs)),)](x, x, xb, ec[0], ec[1], M, K=K, GROUPSIZE=gs,
                                                                  HAS_RMS=False, EPS=0.0, GB=max(1, 512 // gs),
                                                                  PDL=False, num_warps=4)
    y = x.new_empty(M, N)
    G._int4_imma_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](xb, ec[0], ec[1], w, s, z, s, y, x, x, x, x, M, N, K=K,
                                                           GROUPSIZE=gs, HAS_BIAS=False, HAS_GATE=False,
                                                           HAS_RES=False, PDL=False, **cfg)
    return y


def check(device, dtype) -> float:
    """Worst relative error (norm) against the dequantized weights in float64, over ragged shapes and 1..8 rows."""
    torch.manual_seed(0)
    worst = 0.0
    for N, K, g, M in [(64, 256, 128, 6), (40, 96, 32, 3), (24, 512, 256, 8), (200, 4096, 128, 1), (33, 128, 64, 2)]:
        w = torch.randn(N, K)
        s, z = Q.int4_qparams(w, g)
        q = Q.quantize_int4(w, s, z, g)
        x = torch.randn(M, K).to(dtype)
        sd, zd = s.to(dtype), z.to(dtype)
        ref = x.double() @ Q.dequantize_int4(q, sd.float(), zd.float(), g).double().T
        y = imma_gemm(x.to(device), Q.pack_int4(q, g).to(device), sd.to(device), zd.to(device), g)
        worst = max(worst, ((y.double().cpu() - ref).norm() / ref.norm()).item())
    return worst


def resources():
    """What the GEMM takes from an SM at each tile (scripts/kernel_resources.py's measures), K = 4096, g = 128."""
    import kernel_resources as KR
    pointers = dict(xb_ptr="*i8", ec_ptr="*fp32", xc_ptr="*fp32", w_ptr="*u8", s_ptr="*bf16", z_ptr="*bf16",
                    b_ptr="*bf16", y_ptr="*bf16", g_ptr="*u8", gs_ptr="*bf16", gz_ptr="*bf16", res_ptr="*bf16")
    print(f"{'BLOCK_N, warps, stages':<24} {'registers':>9} {'shared B':>9} {'programs/SM':>12} {'instr/KB':>9}")
    for n, w, st in [(128, 4, 3), (64, 4, 3), (256, 8, 3), (128, 8, 2)]:
        consts = dict(GROUPSIZE=128, BLOCK_N=n, HAS_BIAS=False, HAS_GATE=False, HAS_RES=False, PDL=True)
        r = KR.compile_sm(G._int4_imma_kernel, pointers, dict(consts, K=4096), w, st)
        loop = KR.compile_sm(G._int4_imma_kernel, pointers, dict(consts, K=1 << 16), w, st)
        per_kb = loop["loop_instructions"] * w / (n * 64 / 1024)  # a trip: BLOCK_N rows of a group, 64 bytes each
        print(f"{str((n, w, st)):<24} {r['regs']:>9} {r['shared']:>9} {r['programs_per_sm']:>12} {per_kb:>9.0f}")


def main():
    if "--resources" in sys.argv:
        return resources()
    if not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("error: no CUDA GPU; run the check alone on the CPU with TRITON_INTERPRET=1")
        print("check (interpreter): worst relative error bfloat16", check("cpu", torch.bfloat16))
        return
    from bench import copy_bandwidth
    from gemv_sweep import graph_time, layer_shapes, random_int4
    print("check: worst relative error bfloat16", check("cuda", torch.bfloat16), flush=True)
    g = 128
    shapes = layer_shapes(sys.argv[1] if len(sys.argv) > 1 else "Llama-2-7B")
    torch.manual_seed(0)
    w4 = random_int4(shapes, g)
    nbytes = sum(w.numel() + 2 * s.numel() * 2 for w, s, _ in w4)
    copy = copy_bandwidth("cuda")
    print(f"copy {copy:.0f} GB/s; {len(shapes) // 5} layers of int4 g{g} matmuls, no norms, w1 and w3 apart",
          flush=True)
    grid = [dict(BLOCK_N=n, num_warps=w, num_stages=st) for n, w, st in itertools.product([128, 64, 256], [4, 8],
                                                                                          [3, 4, 2])]
    best = CFG
    for rows in (6, 4, 8, 2, 1):
        t0 = time.time()
        x = torch.randn(rows, max(k for _, k in shapes), device="cuda", dtype=torch.bfloat16)
        xs = [x[:, :k].contiguous() for _, k in shapes]
        shipped = "gemv.py" + (" (XQ GEMV)" if rows > 1 else " (one-row GEMV)")
        runs = [(shipped, None, lambda: [G.int4_gemv(xi, w, s, z, g) for xi, (w, s, z) in zip(xs, w4)])]
        for cfg in grid if rows == 6 else [best]:
            runs.append((f"int8 tensor cores {tuple(cfg.values())}", cfg,
                         lambda cfg=cfg: [imma_gemm(xi, w, s, z, g, cfg) for xi, (w, s, z) in zip(xs, w4)]))
        results = []
        for name, cfg, fn in runs:
            if time.time() - t0 > (240 if rows == 6 else 60):
                break  # the rest of the grid: not timed
            try:
                gbs = nbytes / graph_time(fn) / 1e9
            except Exception as e:  # noqa: BLE001
                print(f"rows={rows} {name} failed: {type(e).__name__}: {e}"[:300], flush=True)
                continue
            results.append((gbs, cfg))
            print(f"rows={rows} {name:40s} {gbs:7.0f} GB/s {100 * gbs / copy:5.1f}%", flush=True)
        tiles = [r for r in results if r[1] is not None]
        if rows == 6 and tiles:
            best = max(tiles, key=lambda r: r[0])[1]
    print("(BLOCK_N, num_warps, num_stages)")


if __name__ == "__main__":
    main()
