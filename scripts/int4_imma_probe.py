"""int4 weights times 1..8 rows of x on the int8 tensor cores, timed bare against gemv.py's kernels: an experiment
that lost (H100, session 42), kept so that its figures reproduce.

The XQ GEMV that verification runs over 2..8 rows spends four dp2a a word of 8 weights for every row of x: compiled
for sm_90, 366 loop instructions a KB at 6 rows, 192 of them dp2a. Here x is rounded per group onto 15-bit integers
(the rounding loses under 2**-14 of the group's largest magnitude, below x's own bfloat16 rounding) and split into
hi = q >> 7 (-128..127) and lo = q & 127, both int8, laid out as the dot's second operand, (K, 16): column m the hi
part of x's row m, column 8 + m its lo part. W's nibbles q (0..15) are the first operand as int8, two masks of a
32-bit register each, so D = q . xb is exact in int32, and per group

    acc += D * s * ec + (z - 8 s) * xc,   ec = (128 e for the hi columns, e for the lo), xc = (X e, 0)

with e the group's scale of x and X the sum of its integers; the hi and lo columns are added at the end. Its cost a
KB of weights does not grow with x's rows.

It streams the 7B's layers at 24% of copy at any row count, against gemv.py's 46.8% / 44.4% / 32.2% / 25.1% at
2 / 4 / 6 / 8 rows (H100, session 42, BENCHMARKS.md). Each program loads x's two halves of a group (2 KB) and the
group's scales for every group step, so a tile of few weight rows pays them for few weight bytes (`--resources`,
sm_90: 139 loop instructions a KB at 128 rows and 4 warps, 293 at 32 rows and 2 warps), while many rows a program
leave SMs idle (wo's 4096 rows make 32 programs of 128 rows for 132 SMs). AHEAD = 1 loads the next group's weights
and scales by hand while this group's dots run; it made every tile slower. Checks itself against the dequantized
weights, then times it over a model's layers (one CUDA graph, as scripts/gemv_sweep.py; no norms, w1 and w3 as two
matmuls), a sweep of its tile at 6 rows.

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

CFG = dict(BLOCK_N=32, AHEAD=0, num_warps=2, num_stages=3)  # the best of session 42's sweep at 6 rows
PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def _xb_kernel(x_ptr, xb_ptr, ec_ptr, xc_ptr, M, K: tl.constexpr, GROUPSIZE: tl.constexpr, GB: tl.constexpr):
    # GB groups of all of x's rows (up to 8; absent rows become zeros) a program: x rounded per group onto 15-bit
    # integers q by its largest magnitude, split into hi = q >> 7 and lo = q & 127, stored as int8 columns m and
    # 8 + m of xb (K, 16); ec (groups, 16), the group's scale (that magnitude / 16383) times 128 for the hi columns
    # and as it is for the lo; xc, the scale times the sum of the group's q for the hi columns, 0 for the lo
    NG: tl.constexpr = K // GROUPSIZE
    g = tl.program_id(0) * GB + tl.arange(0, GB)
    m = tl.arange(0, 8)
    offs = g[:, None] * GROUPSIZE + tl.arange(0, GROUPSIZE)[None, :]  # (GB, GROUPSIZE)
    ok = (g < NG)[:, None]
    x = tl.load(x_ptr + m[:, None, None] * K + offs[None], mask=(m < M)[:, None, None] & ok[None], other=0.0)
    x = x.to(tl.float32)  # (8, GB, GROUPSIZE)
    a = tl.abs(x)
    amax = tl.max(tl.where(a == a, a, float("inf")), axis=2)  # (8, GB); NaN counts as infinite
    q = (x * (16383.0 / tl.maximum(amax, 1e-30))[:, :, None] + 12582912.0).to(tl.int32, bitcast=True)
    q -= 0x4B400000  # the integer under 1.5 * 2**23
    tl.store(xb_ptr + offs[None] * 16 + m[:, None, None], (q >> 7).to(tl.int8), mask=ok[None])
    tl.store(xb_ptr + offs[None] * 16 + 8 + m[:, None, None], (q & 127).to(tl.int8), mask=ok[None])
    e = amax / 16383.0
    c, in_range = g[None, :] * 16 + m[:, None], (g < NG)[None, :]  # (8, GB)
    tl.store(ec_ptr + c, 128.0 * e, mask=in_range)
    tl.store(ec_ptr + c + 8, e, mask=in_range)
    tl.store(xc_ptr + c, tl.sum(q, axis=2).to(tl.float32) * e, mask=in_range)
    tl.store(xc_ptr + c + 8, tl.zeros_like(e), mask=in_range)


@triton.jit
def _int8_nibbles(b):
    # uint8 bytes -> their low nibbles and their high ones as int8: two masks of a 32-bit register of four
    if PTX:
        return tl.inline_asm_elementwise(
            "{ and.b32 $0, $2, 0x0F0F0F0F; shr.b32 $1, $2, 4; and.b32 $1, $1, 0x0F0F0F0F; }",
            "=r,=r,r", [b], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    return (b & 15).to(tl.int8), (b >> 4).to(tl.int8)


@triton.jit
def _group(w_ptr, s_ptr, z_ptr, rows, g, N, K: tl.constexpr, GROUPSIZE: tl.constexpr):
    # group g of W's rows: (len(rows), GROUPSIZE // 2) bytes (pack_int4's layout: the group's first half of
    # columns in the low nibbles), its scales and zeros; zeros past N or past the last group
    NG: tl.constexpr = K // GROUPSIZE
    ok = (rows < N) & (g < NG)
    offs = rows[:, None] * (K // 2) + (g * (GROUPSIZE // 2) + tl.arange(0, GROUPSIZE // 2))[None, :]
    b = tl.load(w_ptr + offs, mask=ok[:, None], other=0, eviction_policy="evict_first")
    s = tl.load(s_ptr + rows * NG + g, mask=ok, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + rows * NG + g, mask=ok, other=0.0).to(tl.float32)
    return b, s, z


@triton.jit
def _imma_kernel(xb_ptr, ec_ptr, xc_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K: tl.constexpr, GROUPSIZE: tl.constexpr,
                 BLOCK_N: tl.constexpr, AHEAD: tl.constexpr):
    # y (M, N) = x (M, K) @ W.T for M <= 8 rows, x as _xb_kernel leaves it: a group of W's BLOCK_N rows a step,
    # its nibbles made int8 by two masks, two int8 dots against xb give D exactly, and y += D s ec + (z - 8 s) xc in
    # float32, the hi and lo columns added at the end. AHEAD: group g + 1 loaded before group g's dots
    H: tl.constexpr = GROUPSIZE // 2
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j, c = tl.arange(0, H), tl.arange(0, 16)
    acc = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    b, s, z = _group(w_ptr, s_ptr, z_ptr, rows, 0, N, K, GROUPSIZE)
    for g in range(0, K // GROUPSIZE):
        if AHEAD:
            b_next, s_next, z_next = _group(w_ptr, s_ptr, z_ptr, rows, g + 1, N, K, GROUPSIZE)
        else:
            b, s, z = _group(w_ptr, s_ptr, z_ptr, rows, g, N, K, GROUPSIZE)
        x1 = tl.load(xb_ptr + (g * GROUPSIZE + j)[:, None] * 16 + c[None, :])  # (H, 16): the group's first half
        x2 = tl.load(xb_ptr + (g * GROUPSIZE + H + j)[:, None] * 16 + c[None, :])
        ec, xc = tl.load(ec_ptr + g * 16 + c), tl.load(xc_ptr + g * 16 + c)
        lo, hi = _int8_nibbles(b)
        d = tl.dot(hi, x2, tl.dot(lo, x1, out_dtype=tl.int32), out_dtype=tl.int32)  # (BLOCK_N, 16)
        acc += d.to(tl.float32) * s[:, None] * ec[None, :] + (z - 8.0 * s)[:, None] * xc[None, :]
        if AHEAD:
            b, s, z = b_next, s_next, z_next
    y = tl.sum(tl.reshape(tl.trans(acc), (2, 8, BLOCK_N)), axis=0)  # hi + lo columns: (8, BLOCK_N)
    m = tl.arange(0, 8)
    offs, ok = m[:, None] * N + rows[None, :], (m[:, None] < M) & (rows[None, :] < N)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


def imma_gemm(x, w, s, z, gs, cfg=None):
    """x (M <= 8, K) contiguous, K whole groups of gs >= 64 columns (a GPU's int8 dot takes 32 or more); pack_int4's
    weight (N, K/2) uint8, scales and zeros (N, K/gs)."""
    cfg = cfg or CFG
    (M, K), N = x.shape, w.shape[0]
    xb, ec = torch.empty(K, 16, dtype=torch.int8, device=x.device), torch.empty(2, K // gs, 16, device=x.device)
    gb = max(1, 512 // gs)
    _xb_kernel[(triton.cdiv(K // gs, gb),)](x, xb, ec[0], ec[1], M, K=K, GROUPSIZE=gs, GB=gb, num_warps=4)
    y = x.new_empty(M, N)
    _imma_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](xb, ec[0], ec[1], w, s, z, y, M, N, K=K, GROUPSIZE=gs, **cfg)
    return y


def check(device, dtype) -> float:
    """Worst relative error (norm) against the dequantized weights in float64, over ragged shapes and 1..8 rows, with
    and without AHEAD."""
    torch.manual_seed(0)
    worst = 0.0
    for N, K, g, M in [(64, 256, 128, 6), (40, 192, 64, 3), (24, 512, 256, 8), (200, 4096, 128, 1), (33, 128, 64, 2)]:
        w = torch.randn(N, K)
        s, z = Q.int4_qparams(w, g)
        q = Q.quantize_int4(w, s, z, g)
        x = torch.randn(M, K).to(dtype)
        sd, zd = s.to(dtype), z.to(dtype)
        ref = x.double() @ Q.dequantize_int4(q, sd.float(), zd.float(), g).double().T
        for ahead in (0, 1):
            y = imma_gemm(x.to(device), Q.pack_int4(q, g).to(device), sd.to(device), zd.to(device), g,
                          dict(CFG, AHEAD=ahead))
            worst = max(worst, ((y.double().cpu() - ref).norm() / ref.norm()).item())
    return worst


def resources():
    """What the GEMM takes from an SM at each tile (scripts/kernel_resources.py's measures), K = 4096, g = 128."""
    import kernel_resources as KR
    pointers = dict(xb_ptr="*i8", ec_ptr="*fp32", xc_ptr="*fp32", w_ptr="*u8", s_ptr="*bf16", z_ptr="*bf16",
                    y_ptr="*bf16")
    print(f"{'BLOCK_N, AHEAD, warps':<24} {'registers':>9} {'shared B':>9} {'programs/SM':>12} {'instr/KB':>9}")
    for n, ahead, w in [(128, 0, 4), (64, 0, 4), (32, 0, 2), (32, 1, 2), (16, 0, 1), (16, 1, 1)]:
        consts = dict(GROUPSIZE=128, BLOCK_N=n, AHEAD=ahead)
        r = KR.compile_sm(_imma_kernel, pointers, dict(consts, K=4096), w)
        loop = KR.compile_sm(_imma_kernel, pointers, dict(consts, K=1 << 16), w)
        per_kb = loop["loop_instructions"] * w / (n * 64 / 1024)  # a trip: BLOCK_N rows of a group, 64 bytes each
        print(f"{str((n, ahead, w)):<24} {r['regs']:>9} {r['shared']:>9} {r['programs_per_sm']:>12} {per_kb:>9.0f}")


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
    grid = [dict(BLOCK_N=n, AHEAD=a, num_warps=w, num_stages=3) for n, a, w in itertools.product([16, 32, 64], [0, 1],
                                                                                                [1, 2, 4])]
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
    print("(BLOCK_N, AHEAD, num_warps, num_stages)")


if __name__ == "__main__":
    main()
