"""An experiment, not used by the model: int4 weights times 2..8 rows of x (speculative verification) on the int8
tensor cores, where gemv.py's XQ GEMV spends four dp2a a word of 8 weights for every row of x (at 6 rows, 192 of its
366 instructions a KB, compiled for sm_90; 32.6% of copy over the 7B's layers, session 41).

x is rounded per group of g columns onto 15-bit integers (its largest magnitude to 16383: the rounding loses under
2**-14 of it, below x's own bfloat16 rounding) and each integer split into hi = q >> 7 (-128..127) and lo = q & 127,
both int8. `xb_kernel` lays them out as the dot's second operand, (K, 16) int8: column m the hi part of x's row m,
column 8 + m its lo part. W's nibbles q (0..15, pack_int4's layout) are the first operand as int8, two masks of a
32-bit register each, so D = q . xb is exact in int32 (hi and lo columns side by side), and per group

    acc += D * s * ec + (z - 8 s) * xc,   ec = (128 e for the hi columns, e for the lo), xc = (X e, 0)

with e the group's scale of x and X the sum of its integers; the hi and lo columns are added at the end. The cost
a KB of weights does not grow with x's rows (up to 8). Compiled for sm_90 at 128 weight rows a program and 4 warps
(Triton 3.6): 138 loop instructions a KB, 96 registers, 18 KB of shared memory (wgmma from shared memory).
Checks itself against the dequantized weights, then times it over a model's layers (one CUDA graph, as
scripts/gemv_sweep.py; no norms, w1 and w3 as two matmuls) against gemv.py's int4 kernels at 1, 2, 4, 6 and 8 rows.

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
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gemv as G  # noqa: E402
import quantize as Q  # noqa: E402

PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def _nibbles(b):
    # uint8 bytes -> their low nibbles and their high ones as int8, four bytes a 32-bit register
    if PTX:
        return tl.inline_asm_elementwise(
            "{ and.b32 $0, $2, 0x0F0F0F0F; shr.b32 $1, $2, 4; and.b32 $1, $1, 0x0F0F0F0F; }",
            "=r,=r,r", [b], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    return (b & 15).to(tl.int8), (b >> 4).to(tl.int8)


@triton.jit
def xb_kernel(x_ptr, xb_ptr, ec_ptr, xc_ptr, M, K: tl.constexpr, GS: tl.constexpr, GB: tl.constexpr):
    # GB groups of all of x's rows (up to 8; absent rows are written as zeros) a program
    NG: tl.constexpr = K // GS
    g = tl.program_id(0) * GB + tl.arange(0, GB)
    m = tl.arange(0, 8)
    offs = g[:, None] * GS + tl.arange(0, GS)[None, :]  # (GB, GS)
    ok = (g < NG)[:, None]
    x = tl.load(x_ptr + m[:, None, None] * K + offs[None], mask=(m < M)[:, None, None] & ok[None], other=0.0)
    x = x.to(tl.float32)  # (8, GB, GS)
    amax = tl.max(tl.abs(x), axis=2)  # (8, GB)
    q = (x * (16383.0 / tl.maximum(amax, 1e-30))[:, :, None] + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
    tl.store(xb_ptr + offs[None] * 16 + m[:, None, None], (q >> 7).to(tl.int8), mask=ok[None])
    tl.store(xb_ptr + offs[None] * 16 + 8 + m[:, None, None], (q & 127).to(tl.int8), mask=ok[None])
    e = amax / 16383.0
    c, in_range = g[None, :] * 16 + m[:, None], (g < NG)[None, :]  # (8, GB)
    tl.store(ec_ptr + c, 128.0 * e, mask=in_range)
    tl.store(ec_ptr + c + 8, e, mask=in_range)
    tl.store(xc_ptr + c, tl.sum(q, axis=2).to(tl.float32) * e, mask=in_range)
    tl.store(xc_ptr + c + 8, tl.zeros_like(e), mask=in_range)


@triton.jit
def imma_kernel(xb_ptr, ec_ptr, xc_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K: tl.constexpr, GS: tl.constexpr,
                BLOCK_N: tl.constexpr):
    # y (M, N) = x (M, K) @ W.T for M <= 8, a group of W's BLOCK_N rows a step; the group's two halves of columns
    # are the low and high nibbles of its bytes
    H: tl.constexpr = GS // 2
    NG: tl.constexpr = K // GS
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, H)
    c = tl.arange(0, 16)
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    for g in range(0, NG):
        b = tl.load(w_ptr + rows[:, None] * (K // 2) + (g * H + j)[None, :], mask=rows[:, None] < N, other=0,
                    eviction_policy="evict_first")  # (BLOCK_N, H) uint8
        lo, hi = _nibbles(b)
        x1 = tl.load(xb_ptr + (g * GS + j)[:, None] * 16 + c[None, :])  # (H, 16) int8: the first half's columns
        x2 = tl.load(xb_ptr + (g * GS + H + j)[:, None] * 16 + c[None, :])
        d = tl.dot(hi, x2, tl.dot(lo, x1, out_dtype=tl.int32), out_dtype=tl.int32)  # (BLOCK_N, 16) exact
        s = tl.load(s_ptr + rows * NG + g, mask=rows < N, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rows * NG + g, mask=rows < N, other=0.0).to(tl.float32)
        ec = tl.load(ec_ptr + g * 16 + c)
        xc = tl.load(xc_ptr + g * 16 + c)
        acc += d.to(tl.float32) * s[:, None] * ec[None, :] + (z - 8.0 * s)[:, None] * xc[None, :]
    y = tl.sum(tl.reshape(tl.trans(acc), (2, 8, BLOCK_N)), axis=0)  # hi + lo columns: (8, BLOCK_N)
    m = tl.arange(0, 8)
    tl.store(y_ptr + m[:, None] * N + rows[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(m[:, None] < M) & (rows[None, :] < N))


CFG = dict(BLOCK_N=128, num_warps=4, num_stages=3)


def imma_gemm(x, w, s, z, gs, cfg=None):
    """x (M <= 8, K) contiguous, K whole groups; pack_int4's weight (N, K/2) uint8, scales and zeros (N, K/g)."""
    cfg = cfg or CFG
    (M, K), N = x.shape, w.shape[0]
    xb = torch.empty(K, 16, dtype=torch.int8, device=x.device)
    ec, xc = (torch.empty(K // gs, 16, dtype=torch.float32, device=x.device) for _ in range(2))
    gb = max(1, 512 // gs)
    xb_kernel[(triton.cdiv(K // gs, gb),)](x, xb, ec, xc, M, K=K, GS=gs, GB=gb, num_warps=4)
    y = x.new_empty(M, N)
    imma_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](xb, ec, xc, w, s, z, y, M, N, K=K, GS=gs, **cfg)
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
                    y_ptr="*bf16")
    print(f"{'BLOCK_N, warps, stages':<24} {'registers':>9} {'shared B':>9} {'programs/SM':>12} {'instr/KB':>9}")
    for n, w, st in [(128, 4, 3), (64, 4, 3), (256, 8, 3), (128, 8, 2)]:
        r = KR.compile_sm(imma_kernel, pointers, dict(K=4096, GS=128, BLOCK_N=n), w, st)
        loop = KR.compile_sm(imma_kernel, pointers, dict(K=1 << 16, GS=128, BLOCK_N=n), w, st)
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
