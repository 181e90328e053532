"""int4 weights times 1..8 rows of x on the bfloat16 tensor cores through mma.sync, the weights pre-shuffled so that
each thread loads its own part of an mma operand: an experiment, timed bare against gemv.py's kernels.

gemv.py's int4 GEMV spends dp2a instructions on every row of x (compiled for sm_90: 182 loop instructions a KB of
weights at one row, 366 at six), and Triton's `tl.dot` over int4 weights loads them through shared memory (the
int8-tensor-core probe, scripts/int4_imma_probe.py: 24% of copy at any row count). Marlin's way is a third: the
weights are stored in the order in which mma.sync's operand fragments sit in the threads' registers, so each thread
loads 16 contiguous bytes, makes them bfloat16 with a mask and an OR per pair (no shared memory, no shuffles), and
one m16n8k16 mma multiplies 16 weight rows by up to 8 rows of x. Its cost a KB does not grow with x's rows.

The layout (quantize.shuffle_int4): W in tiles of 16 rows by 64 columns, 512 bytes, one a warp step. Lane l = 4 g + t
holds 4 words; word j holds rows g and g + 8 at columns c..c+3, c = 16 t + 4 j, a nibble each:

    nibble  0        1          2          3            4          5            6          7
    weight  W[g][c]  W[g+8][c]  W[g][c+2]  W[g+8][c+2]  W[g][c+1]  W[g+8][c+1]  W[g][c+3]  W[g+8][c+3]

so that (word >> 4 i) & 0x000F000F | 0x43004300 is the i-th A register of the mma, two bfloat16 128 + q. The mma's
k index 2t, 2t+1, 2t+8, 2t+9 stands for column c, c+1, c+2, c+3, so each lane's x (the B operand, x's row g) is 16
contiguous columns a tile, four 8-byte loads. Each group adds s * D + (z - 136 s) * X in float32 (D the mma sums
over 128 + q, X the sums of x over the group: one more mma with A all ones), as gemv.py's kernels do; the warps of a
program split K and add their sums at the end. Output row n, weight row r: lane (g, t) holds (2t, g), (2t+1, g),
(2t, g+8), (2t+1, g+8) of the tile.

Measured (H100, session 46, BENCHMARKS.md "int4 on the bfloat16 tensor cores"): correct (the bfloat16 output's
rounding) at 1..8 rows and group sizes 64-256; over Llama-2-7B's int4 layers, each matmul at its best tile, 55.5%
of copy at 6 rows against 32.4% for gemv.py's XQ GEMV, 52.6% against 25.0% at 8, but 62.8% against 65.6% at one
row (wo and w2, 4096 tile rows' worth of programs, stream at 44% and 60%). STAGES > 0 (Triton's pipeliner,
through shared memory) was slower at every tile. gemv.py's _int4_mma_kernel is this kernel with the model's norm,
gate-up pair and residual (quantize.prepare_for_device(int4_kernel="mma"); not yet timed in the model); the copy
here stays as it was measured, so that these figures reproduce.

    python scripts/int4_mma_probe.py [MODEL]       # on CUDA: check, then time over the model's layers
    python scripts/int4_mma_probe.py --emulate     # any machine: the layout checked by a per-lane emulation in torch
    python scripts/int4_mma_probe.py --resources   # any machine: the kernel compiled for sm_90
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import quantize as Q  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

def shuffle_int4(q: torch.Tensor) -> torch.Tensor:
    """quantize.shuffle_int4's words, flat (the layout above)."""
    return Q.shuffle_int4(q).reshape(-1)


def _bf16_pair(bits: torch.Tensor) -> torch.Tensor:
    """int64 32-bit patterns of two bfloat16 -> (..., 2) float64 values, the low half first."""
    lo, hi = (bits & 0xFFFF) << 16, ((bits >> 16) & 0xFFFF) << 16
    return torch.stack([lo, hi], -1).to(torch.int32).view(torch.float32).double()


def emulate(x: torch.Tensor, words: torch.Tensor, s: torch.Tensor, z: torch.Tensor, groupsize: int) -> torch.Tensor:
    """What the kernel computes, lane by lane, from the PTX ISA's m16n8k16 fragment layouts, in float64: x (M <= 8,
    K), words from shuffle_int4, scales and zeros (N, K / groupsize) -> (M, N). Checks the layout without a GPU."""
    M, K = x.shape
    N = s.shape[0]
    NC = K // 64
    xp = torch.zeros(8, K, dtype=torch.float64)
    xp[:M] = x.double()
    w = words.view(torch.uint32).to(torch.int64).view(N // 16, NC, 32, 4)  # (R, C, lane, j)
    lane = torch.arange(32)
    g, t = lane >> 2, lane & 3
    y = torch.zeros(N // 16, 32, 4, dtype=torch.float64)  # each lane's 4 sums, every tile
    D = torch.zeros_like(y)
    X = torch.zeros(32, 4, dtype=torch.float64)
    cols = torch.arange(4)
    for C in range(NC):
        for j in range(4):
            # A registers i = 0..3: (word >> 4i) & 0x000F000F | 0x43004300, each two bfloat16
            a = torch.stack([_bf16_pair(((w[:, C, :, j] >> (4 * i)) & 0x000F000F) | 0x43004300) for i in range(4)],
                            2)  # (R, lane, reg, 2)
            c = 64 * C + 16 * t + 4 * j  # each lane's first column, (32,)
            b = xp[g[:, None], c[:, None] + cols]  # its B registers: x[g][c..c+3] as (b0, b1), (b2, b3)
            # the mma: A (16 x 16) and B (16 x 8) gathered from all lanes by the fragment layouts
            A = torch.zeros(N // 16, 16, 16, dtype=torch.float64)
            B = torch.zeros(16, 8, dtype=torch.float64)
            for ln in range(32):
                gg, tt = ln >> 2, ln & 3
                A[:, gg, 2 * tt:2 * tt + 2] = a[:, ln, 0]
                A[:, gg + 8, 2 * tt:2 * tt + 2] = a[:, ln, 1]
                A[:, gg, 2 * tt + 8:2 * tt + 10] = a[:, ln, 2]
                A[:, gg + 8, 2 * tt + 8:2 * tt + 10] = a[:, ln, 3]
                B[2 * tt:2 * tt + 2, gg] = b[ln, 0:2]
                B[2 * tt + 8:2 * tt + 10, gg] = b[ln, 2:4]
            Cm, Cx = A @ B, torch.ones(16, 16, dtype=torch.float64) @ B  # (R, 16, 8), (16, 8)
            for ln in range(32):  # the C fragment: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
                gg, tt = ln >> 2, ln & 3
                D[:, ln] += torch.stack([Cm[:, gg, 2 * tt], Cm[:, gg, 2 * tt + 1], Cm[:, gg + 8, 2 * tt],
                                         Cm[:, gg + 8, 2 * tt + 1]], -1)
                X[ln] += torch.stack([Cx[gg, 2 * tt], Cx[gg, 2 * tt + 1], Cx[gg + 8, 2 * tt], Cx[gg + 8, 2 * tt + 1]])
        if (64 * (C + 1)) % groupsize == 0:  # the group ends: y += s * D + (z - 136 s) * X
            grp = 64 * C // groupsize
            rows = 16 * torch.arange(N // 16)[:, None] + g[None, :]  # (R, lane): row g; g + 8 below
            sg, zg = s[rows, grp].double(), z[rows, grp].double()
            s8, z8 = s[rows + 8, grp].double(), z[rows + 8, grp].double()
            sc = torch.stack([sg, sg, s8, s8], -1)
            cc = torch.stack([zg - 136 * sg, zg - 136 * sg, z8 - 136 * s8, z8 - 136 * s8], -1)
            y += sc * D + cc * X
            D.zero_()
            X.zero_()
    out = torch.zeros(8, N, dtype=torch.float64)
    rows = 16 * torch.arange(N // 16)[:, None] + g[None, :]
    out[2 * t, rows] = y[..., 0]
    out[2 * t + 1, rows] = y[..., 1]
    out[2 * t, rows + 8] = y[..., 2]
    out[2 * t + 1, rows + 8] = y[..., 3]
    return out[:M]


if triton is not None:
    def _step_asm() -> str:
        # a lane's 64-column tile: four k-steps of 16, each two mma (D over 128 + q, X over ones)
        lines = ["{ .reg .b32 w0, w1, w2, w3, b0, b1, b2, b3, b4, b5, b6, b7, a0, a1, a2, a3, t, o;",
                 "mov.b64 {w0, w1}, $8; mov.b64 {w2, w3}, $9; mov.b64 {b0, b1}, $10; mov.b64 {b2, b3}, $11;",
                 "mov.b64 {b4, b5}, $12; mov.b64 {b6, b7}, $13; mov.b32 o, 0x3F803F80;"]
        lines += [f"mov.b32 ${i}, ${i + 14};" for i in range(8)]
        for j in range(4):
            lines.append(f"lop3.b32 a0, w{j}, 0x000F000F, 0x43004300, 0xEA;")
            for i in (1, 2, 3):
                lines.append(f"shr.b32 t, w{j}, {4 * i}; lop3.b32 a{i}, t, 0x000F000F, 0x43004300, 0xEA;")
            b = f"{{b{2 * j}, b{2 * j + 1}}}"
            lines.append("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {a0, a1, a2, a3}, "
                         f"{b}, {{$0, $1, $2, $3}};")
            lines.append("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$4, $5, $6, $7}, {o, o, o, o}, "
                         f"{b}, {{$4, $5, $6, $7}};")
        return " ".join(lines) + " }"

    STEP_ASM = tl.constexpr(_step_asm())

    @triton.jit
    def _tile(w01, w23, x0, x1, x2, x3, d0, d1, d2, d3, e0, e1, e2, e3):
        # one tile of a lane: its 4 words (two int64) and x's 16 columns (four int64) into D (d) and X (e)
        return tl.inline_asm_elementwise(
            STEP_ASM, "=f,=f,=f,=f,=f,=f,=f,=f,l,l,l,l,l,l,f,f,f,f,f,f,f,f",
            [w01, w23, x0, x1, x2, x3, d0, d1, d2, d3, e0, e1, e2, e3], dtype=(tl.float32,) * 8, is_pure=True, pack=1)

    @triton.jit
    def _load_tile(w64, x64, R, C, lane, x_row, ok, x_ok, NC: tl.constexpr):
        # tile C of tile row R: a lane's two int64 of words and x's four int64 (zeros where not ok)
        wo = ((R * NC + C) * 32 + lane) * 2
        w01 = tl.load(w64 + wo, eviction_policy="evict_first")
        w23 = tl.load(w64 + wo + 1, eviction_policy="evict_first")
        xo = x_row + C * 16
        xm = ok & x_ok
        return (w01, w23, tl.load(x64 + xo, mask=xm, other=0), tl.load(x64 + xo + 1, mask=xm, other=0),
                tl.load(x64 + xo + 2, mask=xm, other=0), tl.load(x64 + xo + 3, mask=xm, other=0))

    @triton.jit
    def _load_step(w64, x64, R, step, lane, x_row, ok, x_ok, NC: tl.constexpr):
        # a step's two tiles (2 step, 2 step + 1): the weights' address clamped in range (x's zeros void them)
        C = 2 * tl.minimum(step, NC // 2 - 1)
        return _load_tile(w64, x64, R, C, lane, x_row, ok, x_ok, NC) + _load_tile(w64, x64, R, C + 1, lane, x_row,
                                                                                  ok, x_ok, NC)

    @triton.jit
    def _step(acc, v, s_ptr, z_ptr, rows, step, k, ok, GROUPSIZE: tl.constexpr, NG: tl.constexpr):
        # one step's two tiles v into acc (y0..y3, D, X), the scales applied where a group ends
        y0, y1, y2, y3, d0, d1, d2, d3, e0, e1, e2, e3 = acc
        d0, d1, d2, d3, e0, e1, e2, e3 = _tile(v[0], v[1], v[2], v[3], v[4], v[5], d0, d1, d2, d3, e0, e1, e2, e3)
        zero = tl.zeros_like(d0)
        if GROUPSIZE == 64:
            y0, y1, y2, y3 = _scale(y0, y1, y2, y3, d0, d1, d2, d3, e0, e1, e2, e3, s_ptr, z_ptr, rows, 2 * step, ok,
                                    NG)
            d0, d1, d2, d3, e0, e1, e2, e3 = zero, zero, zero, zero, zero, zero, zero, zero
        d0, d1, d2, d3, e0, e1, e2, e3 = _tile(v[6], v[7], v[8], v[9], v[10], v[11], d0, d1, d2, d3, e0, e1, e2,
                                               e3)
        if GROUPSIZE <= 128 or k % 2 == 1:
            grp = (2 * step + 1) // (GROUPSIZE // 64)
            y0, y1, y2, y3 = _scale(y0, y1, y2, y3, d0, d1, d2, d3, e0, e1, e2, e3, s_ptr, z_ptr, rows, grp, ok, NG)
            d0, d1, d2, d3, e0, e1, e2, e3 = zero, zero, zero, zero, zero, zero, zero, zero
        return y0, y1, y2, y3, d0, d1, d2, d3, e0, e1, e2, e3

    @triton.jit
    def _scale(y0, y1, y2, y3, d0, d1, d2, d3, e0, e1, e2, e3, s_ptr, z_ptr, rows, grp, ok, NG: tl.constexpr):
        # the group's s * D + (z - 136 s) * X, rows g and g + 8
        sg = tl.load(s_ptr + rows * NG + grp, mask=ok, other=0.0).to(tl.float32)
        zg = tl.load(z_ptr + rows * NG + grp, mask=ok, other=0.0).to(tl.float32) - 136.0 * sg
        s8 = tl.load(s_ptr + (rows + 8) * NG + grp, mask=ok, other=0.0).to(tl.float32)
        z8 = tl.load(z_ptr + (rows + 8) * NG + grp, mask=ok, other=0.0).to(tl.float32) - 136.0 * s8
        return y0 + sg * d0 + zg * e0, y1 + sg * d1 + zg * e1, y2 + s8 * d2 + z8 * e2, y3 + s8 * d3 + z8 * e3

    @triton.jit
    def _mma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K: tl.constexpr, GROUPSIZE: tl.constexpr,
                    SPLIT: tl.constexpr, STAGES: tl.constexpr = 0):
        # y (M <= 8, N) = x @ W.T for one tile row R of W (16 rows) a program; its SPLIT warps take K in ranges of
        # SPW steps of 128 columns (two tiles), the next step's loads issued before this one's mma
        NC: tl.constexpr = K // 64
        NS: tl.constexpr = K // 128
        NG: tl.constexpr = K // GROUPSIZE
        SPW: tl.constexpr = ((NS + 2 * SPLIT - 1) // (2 * SPLIT)) * 2  # even, so that g = 256 ends on odd steps
        R = tl.program_id(0)
        i = tl.arange(0, 32 * SPLIT)
        lane, warp = i % 32, i // 32
        g, t = lane >> 2, lane & 3
        rows = R * 16 + g
        w64 = w_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
        x64 = x_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
        x_row, x_ok = g * (K // 4) + 4 * t, g < M
        first = warp * SPW
        zero = tl.zeros((32 * SPLIT,), dtype=tl.float32)
        acc = (zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero, zero)  # y, then D, then X
        if STAGES == 0:  # loads a step ahead by hand, two steps a trip so that their registers need no copies
            a = _load_step(w64, x64, R, first, lane, x_row, first < NS, x_ok, NC)
            for k in range(0, SPW, 2):
                step = first + k
                b = _load_step(w64, x64, R, step + 1, lane, x_row, step + 1 < NS, x_ok, NC)
                acc = _step(acc, a, s_ptr, z_ptr, rows, step, k, step < NS, GROUPSIZE, NG)
                a = _load_step(w64, x64, R, step + 2, lane, x_row, (step + 2 < NS) & (k + 2 < SPW), x_ok, NC)
                acc = _step(acc, b, s_ptr, z_ptr, rows, step + 1, k + 1, step + 1 < NS, GROUPSIZE, NG)
        else:  # Triton's pipeliner: STAGES - 1 steps in flight through shared memory
            for k in tl.range(0, SPW, num_stages=STAGES):
                step = first + k
                v = _load_step(w64, x64, R, step, lane, x_row, step < NS, x_ok, NC)
                acc = _step(acc, v, s_ptr, z_ptr, rows, step, k, step < NS, GROUPSIZE, NG)
        y0, y1, y2, y3 = acc[0], acc[1], acc[2], acc[3]
        y0 = tl.sum(tl.reshape(y0, (SPLIT, 32)), axis=0)
        y1 = tl.sum(tl.reshape(y1, (SPLIT, 32)), axis=0)
        y2 = tl.sum(tl.reshape(y2, (SPLIT, 32)), axis=0)
        y3 = tl.sum(tl.reshape(y3, (SPLIT, 32)), axis=0)
        ln = tl.arange(0, 32)
        r, n = R * 16 + (ln >> 2), 2 * (ln & 3)
        tl.store(y_ptr + n * N + r, y0.to(y_ptr.dtype.element_ty), mask=n < M)
        tl.store(y_ptr + (n + 1) * N + r, y1.to(y_ptr.dtype.element_ty), mask=n + 1 < M)
        tl.store(y_ptr + n * N + r + 8, y2.to(y_ptr.dtype.element_ty), mask=n < M)
        tl.store(y_ptr + (n + 1) * N + r + 8, y3.to(y_ptr.dtype.element_ty), mask=n + 1 < M)


def mma_gemm(x, words, s, z, groupsize: int, split: int = 8, stages: int = 0):
    """x (M <= 8, K) bfloat16 contiguous, K a multiple of 128; words from shuffle_int4 (on x's device); scales and
    zeros (N, K / groupsize), groupsize 64, 128 or 256 -> (M, N)."""
    (M, K), N = x.shape, s.shape[0]
    y = x.new_empty(M, N)
    _mma_kernel[(N // 16,)](x, words, s, z, y, M, N, K=K, GROUPSIZE=groupsize, SPLIT=split, STAGES=stages,
                              num_warps=split)
    return y


def _case(N: int, K: int, gs: int, M: int):
    """Random W (N, K) quantized at group size gs and x (M, K) in bfloat16: x, q, scales, zeros and x @ W.T in
    float64 over the dequantized weights."""
    w = torch.randn(N, K)
    s, z = Q.int4_qparams(w, gs)
    q = Q.quantize_int4(w, s, z, gs)
    x = torch.randn(M, K).to(torch.bfloat16)
    s, z = s.to(torch.bfloat16), z.to(torch.bfloat16)
    return x, q, s, z, x.double() @ Q.dequantize_int4(q, s.float(), z.float(), gs).double().T


def check_emulation() -> float:
    """Worst relative error of the emulation against the dequantized weights, over a few shapes."""
    torch.manual_seed(0)
    worst = 0.0
    for N, K, gs, M in [(32, 128, 64, 3), (16, 256, 128, 8), (48, 512, 256, 1), (32, 256, 128, 6)]:
        x, q, s, z, ref = _case(N, K, gs, M)
        y = emulate(x, shuffle_int4(q), s, z, gs)
        worst = max(worst, ((y - ref).norm() / ref.norm()).item())
    return worst


def resources():
    """The kernel compiled for sm_90 (scripts/kernel_resources.py's measures), K = 4096, g = 128, each split."""
    import kernel_resources as KR
    pointers = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*bf16", z_ptr="*bf16", y_ptr="*bf16")
    print(f"{'split (warps)':<14} {'registers':>9} {'spilled B':>9} {'shared B':>9} {'programs/SM':>12} "
          f"{'instr/KB':>9}")
    for split in (2, 4, 8, 16):
        r = KR.compile_sm(_mma_kernel, pointers, dict(K=4096, GROUPSIZE=128, SPLIT=split), split)
        loop = KR.compile_sm(_mma_kernel, pointers, dict(K=1 << 16, GROUPSIZE=128, SPLIT=split), split)
        per_kb = loop["loop_instructions"] / 2  # a trip: two steps of a warp, 2 KB of weights
        print(f"{split:<14} {r['regs']:>9} {r['stack']:>9} {r['shared']:>9} {r['programs_per_sm']:>12} {per_kb:>9.0f}")
        print("   loop ops:", dict(loop["loop_ops"].most_common(12)))


def check(split: int, stages: int) -> float:
    """Worst relative error (norm) of the kernel on CUDA against the dequantized weights in float64, over ragged
    shapes (K not a multiple of 128 * split), 1..8 rows and group sizes 64, 128, 256."""
    torch.manual_seed(0)
    worst = 0.0
    for N, K, gs, M in [(32, 128, 64, 3), (16, 256, 128, 8), (48, 512, 256, 1), (32, 1280, 128, 6),
                        (64, 4096, 128, 1), (32, 11008, 128, 5), (16, 3072, 256, 2), (48, 2176, 64, 7)]:
        x, q, s, z, ref = _case(N, K, gs, M)
        y = mma_gemm(x.cuda(), shuffle_int4(q).cuda(), s.cuda(), z.cuda(), gs, split, stages)
        err = ((y.double().cpu() - ref).norm() / ref.norm()).item()
        if err > 0.01:
            print(f"  split {split} stages {stages} N {N} K {K} g {gs} M {M}: relative error {err:.4f}", flush=True)
        worst = max(worst, err)
    return worst


def main():
    if "--resources" in sys.argv:
        return resources()
    if "--emulate" in sys.argv:
        print("emulation: worst relative error", check_emulation())
        return
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU; --emulate checks the layout on any machine")
    import gemv as G
    from bench import copy_bandwidth
    from gemv_sweep import graph_time, layer_shapes, random_int4
    for split, stages in [(4, 0), (8, 3), (4, 4), (16, 2)]:
        print(f"check split {split} stages {stages}: worst relative error {check(split, stages):.5f}", flush=True)
    gs = 128
    model = next((a for a in sys.argv[1:] if not a.startswith("-")), "Llama-2-7B")
    shapes = layer_shapes(model)
    torch.manual_seed(0)
    w4 = random_int4(shapes, gs)
    shuffled = {}
    for (w, s, z), (n, k) in zip(w4, shapes):
        if (n, k) not in shuffled:  # random bits either way: one shuffled copy a shape is enough to time
            shuffled[(n, k)] = shuffle_int4(Q.unpack_int4(w.cpu(), gs)).cuda()
    words = [shuffled[sh].clone() for sh in shapes]  # each matmul its own weights, as in the model (no L2 reuse)
    copy = copy_bandwidth("cuda")
    print(f"copy {copy:.0f} GB/s; {len(shapes) // 5} layers of int4 g{gs} matmuls, no norms, w1 and w3 apart")
    names = ["wqkv", "wo", "w1", "w3", "w2"]
    kinds = [range(j, len(shapes), 5) for j in range(5)]
    kbytes = [sum(w4[i][0].numel() + 4 * w4[i][1].numel() for i in idx) for idx in kinds]
    grid = [(sp, st) for st in (0, 2, 3, 4) for sp in (2, 4, 8, 16)]
    best = {}  # matmul kind -> (split, stages), from the sweep at 6 rows
    t_start = time.time()
    summary = []
    for rows in (6, 1, 2, 4, 8):
        x = torch.randn(rows, max(k for _, k in shapes), device="cuda", dtype=torch.bfloat16)
        xs = [x[:, :k].contiguous() for _, k in shapes]

        def shipped(idx):
            return [G.int4_gemv(xs[i], *w4[i], gs) for i in idx]

        def mma(idx, cfg):
            return [mma_gemm(xs[i], words[i], w4[i][1], w4[i][2], gs, *cfg(i)) for i in idx]

        def pct(fn, j):
            return 100 * kbytes[j] / graph_time(lambda: fn(kinds[j])) / 1e9 / copy

        base = [pct(shipped, j) for j in range(5)]
        print(f"rows={rows} gemv.py           " + " ".join(f"{n} {p:5.1f}" for n, p in zip(names, base)), flush=True)
        found = {j: (0.0, None) for j in range(5)}
        for cfg in (grid if rows in (6, 1) and time.time() - t_start < 400 else []):
            per = [pct(lambda idx: mma(idx, lambda i: cfg), j) for j in range(5)]
            for j in range(5):
                found[j] = max(found[j], (per[j], cfg))
            print(f"rows={rows} mma {str(cfg):12s} " + " ".join(f"{n} {p:5.1f}" for n, p in zip(names, per)),
                  flush=True)
        if rows == 6:
            best = {j: found[j][1] for j in range(5)}
        chosen = {j: found[j][1] or best[j] for j in range(5)}
        total_b = sum(kbytes)
        t_ship = graph_time(lambda: shipped(range(len(shapes))))
        t_mma = graph_time(lambda: mma(range(len(shapes)), lambda i: chosen[i % 5]))
        row = (rows, 100 * total_b / t_ship / 1e9 / copy, 100 * total_b / t_mma / 1e9 / copy,
               [pct(lambda idx: mma(idx, lambda i: chosen[j]), j) for j in range(5)], chosen)
        summary.append(row)
        print(f"rows={rows} all layers: gemv.py {row[1]:.1f}%, mma (each matmul's tile) {row[2]:.1f}%", flush=True)
    print("\n| rows | gemv.py, all layers | mma, all layers | " + " | ".join(names) + " |")
    for rows, ship, m, per, chosen in summary:
        print(f"| {rows} | {ship:.1f} | {m:.1f} | " + " | ".join(f"{p:.1f} {chosen[j]}" for j, p in
                                                             enumerate(per)) + " |")
    print("(% of copy; mma tiles as (warps splitting K, pipeline stages; 0: a step ahead by hand))")


if __name__ == "__main__":
    main()
