"""Triton matmuls for batch-1 decode and speculative verification on CUDA, for float, int8 and int4 weights.

At batch 1 every linear layer is a matrix-vector product bound by how fast the weights stream from memory.
Over Llama-2-7B-shaped weights cuBLAS streams at about 82% (H200) and 89% (H100) of the device-to-device copy
bandwidth; the float GEMV here at 91% and 98% (scripts/gemv_sweep.py; BENCHMARKS.md has the runs). Speculative
verification multiplies a handful of rows (k+1) by the same weights: there cuBLAS's kernels took 10% (7B) to 65%
(SmolLM2) longer than one GEMV (scripts/profile_step.py), so several rows also get kernels that read each weight
tile once for all of them. Which kernel runs, for M rows of x:

    weights   M = 1                          M = 2..16 (MAX_ROWS)
    float     _gemv_kernel                   _gemv_kernel up to FLOAT_GEMV_ROWS where K <= FLOAT_GEMV_MAX_K,
                                             else _rows_kernel (tensor cores)
    int8      _int8_gemv_kernel (dp2a)       _rows_kernel (tensor cores)
    int4      _int4_kernel (dp2a)            _int4_x_kernel then _int4_kernel (XQ) up to INT4_XQ_ROWS,
                                             else _int4_rows_kernel (tensor cores)
    int4, quantize.shuffle_int4's layout     _int4_mma_kernel (mma.sync), 8 rows a launch ("mma": generate.py's
                                             choice for an int4 target that verifies drafts)

Float GEMV: a (BLOCK_N, BLOCK_K) register tile of float32 products, reduced once at the end; it also takes a few
rows of x, each weight loaded once for all (a small model's verify). The rows kernel multiplies x, padded to 16
rows, by each weight tile with `tl.dot`; int8 weights go in as exact small integers in x's dtype, their scales
applied to the float32 sums at the end.

int8 GEMV, in integers: x is scaled onto int16 by its largest magnitude (the rounding loses under 2**-16 of it, far
below x's own bfloat16 rounding), and two `dp2a` instructions multiply a 32-bit word of four int8 weights by four of
those into int32 sums, made floats once at the end: a third of the instructions of float products (with PDL, 88% of
copy over the 7B layers at the best tile of a sweep, against their 76%; BENCHMARKS.md). Its tile is (word pairs,
rows, 2), so that each thread loads two words of every row and, itself, the x they need. x's range costs each
program a pass over all of x (and the norm's weight) before its first dp2a: about 6 points of copy at kernel level
(H100).

int4 (pack_int4's layout: a scale and zero per group, w = (q - 8) s + z): the int8 GEMV's integers, a word of 8
weights masked into bytes and multiplied by 8 columns of x in four dp2a, each group adding s * D + (z - 8 s) * X in
float32 (D the integer products, X the integer sum of x over the same columns) times the int16 scale of those
columns. At one row each thread makes that scale from its own 32 columns of x (packed bfloat16x2 maxima) instead of
a pass over all of x first (63.6% of copy in the 7B against 59.2%). For 2 to INT4_XQ_ROWS rows a small kernel first
rounds x onto int16 (a scale per group) and sums each thread's 32 columns, so that the GEMV only loads them, once
for all its weight rows, and spends its instructions on the dp2a of each row, x's rows in two blocks of powers of
two (6 = 4 + 2: `xq_blocks`). More rows go to the tensor cores, a group a step, the nibbles made 16-bit floats
OFFSET + q by a prmt under OFFSET's exponent byte (no int-to-float conversion), D = x . (OFFSET + q) and X from two
dots each, then s * D + (z - (OFFSET + 8) s) * X. (The int8 tensor cores, x split into two int8 halves and W's
nibbles int8, lost to the GEMV at every row count from 1 to 8 on an H100: scripts/int4_imma_probe.py.)
The "mma" layout (quantize.prepare_for_device(int4_kernel="mma")) stores W in the order mma.sync's operand
fragments sit in a warp's registers (Marlin's way), so each lane turns its 16 bytes of a 16 x 64 tile into bfloat16
operands with a shift and a LOP3 a register, no shared memory: the same cost for 1 to 8 rows of x (_int4_mma_kernel;
the interpreter emulates its mma in tensor arithmetic). Over the 7B's int4 layers with their norms (H100, session
47) it streams 55.2% of copy at 6 rows against the XQ GEMV's 33.8%, 62.3% at one row against 78.1%: a 7B verifies
6 tokens in 2.34 ms against 3.69 but decodes one in 2.14 against 1.81, so it serves verification only.
On an H100 the GEMV streams Llama-2-7B's int4 layers at about 78% of copy at one row, against 56% for torch's
tinygemm; with the model's norms and residual adds in, 74.3% (session 41, before wqkv had a tile of its own), 47.1%
at four rows (tinygemm 40.7%) and 32.6% at six (tinygemm 31.8%); the bfloat16 tensor-core kernel 21% at six
(BENCHMARKS.md). int8 and int4 are the formats quantize.py writes.

The float, int8 and int4 kernels also take in the small steps around a matmul, so that a layer launches fewer kernels
(`linear`, `fused_block`): SwiGLU's gate and up projections run as one kernel that streams both weights and ends
with the SiLU-times-up, and the residual adds happen in the epilogues of wo and w2. The RMSNorms go in too: the
kernel, which reads all of x in every program anyway, sums its squares on the way and scales by 1/rms at the end.
For float weights `fold_norms` moves each norm's weight into the matmuls after it (so x itself is not scaled, and
in the rows kernel it still streams straight into the tensor cores); the int8 and int4 kernels multiply x by it as
x loads. A decode or verify layer is then five kernels: wqkv, attention (decode_attention.py), wo, the gate-up
pair, w2.

`use_gemv(model)` swaps every float nn.Linear for `GemvLinear`, which takes these paths on CUDA and is F.linear
otherwise (prefill, the CPU), and gives each dense TransformerBlock `fused_block`; quantize.py's Int8Linear and
Int4Linear call `int8_gemv` / `int4_gemv`. Those four are custom ops (`_op`), so that torch.compile keeps them whole
and CUDA graphs capture the GEMVs' launches with programmatic dependent launch (`_pdl`): on Hopper a GEMV starts
loading its weights while the kernel before it finishes. The tiles below were swept on an H100 with
scripts/gemv_sweep.py, each matmul of a layer timed alone (--per_layer) as well as the whole layer.
"""
import functools
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    # inline PTX (NVIDIA only): not under the interpreter, nor on ROCm
    PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1" and torch.version.hip is None)
except ImportError:  # CPU-only installs: GemvLinear then always uses F.linear, quantize.py torch's kernels
    triton = None
PDL_OK = triton is not None and os.environ.get("TRITON_INTERPRET") != "1" and torch.version.hip is None

MAX_ROWS = 16  # the rows kernels pad to 16 (tl.dot's smallest tile): 2..16 rows cost the same
# float weights, tuned on an H200 over Llama-2-7B shapes (one row) and by `scripts/gemv_sweep.py --sweep bf16` (rows,
# the gate-up pair included; H200 for K >= 4096, H100 below): 32 weight rows a program over Llama-2-7B's layers, 16
# over SmolLM2-135M's (K <= 1536), where the grid needs more programs to keep the memory busy
GEMV_CONFIG = dict(BLOCK_N=2, BLOCK_K=1024, num_warps=4, STAGES=1)
# float weights of at most SMALL_K columns (small models: SmolLM2's 576) are latency bound, a few microseconds a
# matmul, and stream faster with one warp a program over 512-column chunks; the output head (N >= WIDE_N) with 4
# weight rows a program. Timed at 1 and 4 rows over SmolLM2-135M's matmuls with their norms, gates and residuals
# (H100, session 43, BENCHMARKS.md: its decode step 429 -> 403 us). One tile serves one row and several and lays
# out its products alike at both, so that a verify's rows get each decode step's sums bit for bit and a greedy
# bfloat16 verify keeps the target's own text (tests/test_gemv.py checks the layouts, compiled for sm_90). The
# sweep's best tile for SmolLM2's w2 (K = 1536; one weight row a program, 4 warps) did not, and parted greedy texts
# on the real model (10 of 24 dev prompts identical, against 24 of 24): wider K keeps GEMV_CONFIG
SMALL_K = 1024
SMALL_GEMV_CONFIG = dict(BLOCK_N=2, BLOCK_K=512, num_warps=1, STAGES=1)  # wqkv, wo
# the gate-up pair: its own copy of that tile, so it can change alone; at 8 rows of x this one spills (255 registers,
# sm_90), so a FLOAT_GEMV_ROWS of 8 would need another, e.g. 1 x 1024, 1 warp: 107 registers, one sum order (session 44)
SMALL_GATE_CONFIG = dict(SMALL_GEMV_CONFIG)
SMALL_HEAD_CONFIG = dict(BLOCK_N=4, BLOCK_K=1024, num_warps=4, STAGES=1)  # the output head
ROWS_CONFIG = dict(BLOCK_N=32, BLOCK_K=256, num_warps=4, num_stages=6)
SMALL_ROWS_CONFIG = dict(BLOCK_N=16, BLOCK_K=128, num_warps=4, num_stages=6)  # K < 4096
# gemm_rows hands up to FLOAT_GEMV_ROWS rows to the GEMV, which loads each weight once for all of them, instead of the
# tensor-core rows kernel, where K <= FLOAT_GEMV_MAX_K: small models' verify, where each matmul is a few microseconds
# of latency. H100: a verify of 4 costs 1.28 decode steps over SmolLM2's layers (K = 576, 1536) against 1.54 through
# the rows kernel, but 1.55 against 1.11 over the 7B's (K = 4096, 11008); compiled for sm_90, the GEMV at 4 rows
# takes the same registers at K = 2048 as at 1536, and at 3072 up to 228 (scripts/kernel_resources.py --K)
FLOAT_GEMV_ROWS = 4
GEMV_TILE_ROWS = 4  # rows of x a pass of the float GEMV over W: more spill its registers (above)
FLOAT_GEMV_MAX_K = 2048
# quantized weights: the tiles swept on an H100 (BENCHMARKS.md; the one-row int8 pair in session 40: 7B decode 82.8%
# -> 84.1% of copy). The one-row int4 GEMV gives each thread four words of a chunk for all its rows, so
# at most BLOCK_W / 4 threads: with more, x went through shared memory to meet the weights (narrow rows: fewer warps)
INT8_CONFIG = dict(BLOCK_N=8, BLOCK_W=512, num_warps=8, STAGES=1)  # BLOCK_W int32 words: 2 KB of a row a step
SCALES_AHEAD = False  # the one-row int8 and int4 GEMVs load their first scales (and int4 zeros) before the PDL wait
# too, not just their first weights: off until a GPU times it (BENCHMARKS.md, "Scales before the wait", session 58)
INT8_LOCAL = False  # x rounded onto int16 per 8 columns inside the one-row int8 GEMV, no pass over x first: off
# until a GPU times it (BENCHMARKS.md, "The int8 GEMV's x scaled per 8 columns", session 58)
INT8_GATE_CONFIG = dict(BLOCK_N=8, BLOCK_W=256, num_warps=4, STAGES=1)  # the gate-up pair: two weights a row
# the one-row int4 GEMV at 4 rows a program, not 8 (H100, session 41, with the norms: wo 51.4% -> 58.0% of copy, w2
# 68.3% -> 70.8%)
INT4_CONFIG = dict(BLOCK_N=4, BLOCK_W=512, num_warps=4, STAGES=1)  # BLOCK_W int32 words: 4096 weights of a row
# the int4 gate-up pair at 4 rows a program, not 2: x's per-32-column scale and norm then serve twice the weight rows
# (H100, session 35: 74.5% of copy at kernel level with the norms, against 69.5%)
INT4_GATE_CONFIG = dict(BLOCK_N=4, BLOCK_W=256, num_warps=4, STAGES=1)  # the gate-up pair: two weights a row
INT8_ROWS_CONFIG = dict(BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=6)
INT4_ROWS_CONFIG = dict(BLOCK_N=32, num_warps=4, num_stages=6)  # a group of W a step
# 2..INT4_XQ_ROWS rows of x: rounded onto int16 first (_int4_x_kernel, INT4_XQ_COLUMNS of a row a program), then the
# int4 GEMV, one warp a program (swept at 4 and 6 rows, H100, session 39: 47.1% / 32.2% of copy against 46.4% / 29.7%
# at 256 words and 2 warps); more rows: the tensor-core rows kernel. 7B verify of 4 2.74 ms, of 6 3.77, of 8 4.61
INT4_XQ_ROWS = 8
INT4_XQ_CONFIG = dict(BLOCK_N=4, BLOCK_W=128, num_warps=1, STAGES=1)
INT4_XQ_COLUMNS = 512
# int4 W with WIDE_N rows or more (the 7B's wqkv, 12288) streams faster with more rows a program than the 4096-row
# matmuls after it, whose tiles above keep their grids filled (H100, session 41: per-matmul sweep with the norms,
# wqkv 71.2% -> 77.2% of copy, at 6 rows 30.7% -> 38.0%; 7B decode +2.5% tok/s, verify of 6 3.757 -> 3.682 ms).
# int8's wqkv also swept faster at 16 x 512 (94.4% -> 97.8%), but the 7B decode did not move: one tile there
WIDE_N = 8192
# the int4 tensor-core kernel (shuffled layout, int4_mma_config), one tile for 1..8 rows: warps a program splitting
# K and 64-column tiles a step, from gemv_sweep.py's per-matmul sweep of the 7B's int4 layers with their norms (H100,
# session 47; % of copy at 1 / 6 rows): wo 44.2 / 34.8 at (8, 2) -> 50.4 / 39.8 at (8, 4); wqkv 53.5 / 38.6 at
# (4, 2) -> 60.4 / 51.8 at (4, 4); the gate-up pair (67.3 / 62.5) and w2 (63.2 / 55.7) keep session 46's tiles
# (session 48 timed two variants in the 7B and took both out: one 16-byte load a lane for W's two words, 400.0 tok/s
# against this kernel's 456.3, and x loaded at its mma instead of a step ahead, 361.1; BENCHMARKS.md)
INT4_MMA_CONFIG = dict(SPLIT=8, TPS=4)
INT4_MMA_WIDE_CONFIG = dict(SPLIT=4, TPS=4)
INT4_MMA_GATE_CONFIG = dict(SPLIT=4, TPS=2)
INT4_MMA_LONG_CONFIG = dict(SPLIT=16, TPS=2)
INT4_MMA_ROWS = 8  # rows of x a launch: the n of mma.sync's m16n8k16
INT4_WIDE_CONFIG = dict(BLOCK_N=16, BLOCK_W=128, num_warps=1, STAGES=1)
INT4_XQ_WIDE_CONFIG = dict(BLOCK_N=8, BLOCK_W=128, num_warps=1, STAGES=1)

if triton is not None:
    @triton.jit
    def _epilogue(y, g, offs, ok, res_ptr, HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr):
        # float32 matmul results y at output offsets `offs`: times SiLU(g), the gate matmul's float32 results
        # (SwiGLU's up projection times its gate), plus the residual (the adds after wo and w2)
        if HAS_GATE:
            y *= g / (1.0 + tl.exp(-g))
        if HAS_RES:
            y += tl.load(res_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        return y

    @triton.jit
    def _store_rows(y, g, b_ptr, y_ptr, res_ptr, ms, rows, M, N, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr,
                    HAS_RES: tl.constexpr):
        # float32 results y (and the gate's g) for x rows ms and W rows `rows`, (len(ms), len(rows)): plus the bias,
        # through _epilogue, stored where they are in range
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
        offs, ok = ms[:, None] * N + rows[None, :], (ms[:, None] < M) & (rows[None, :] < N)
        y = _epilogue(y, g, offs, ok, res_ptr, HAS_GATE, HAS_RES)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _gemv_chunk(acc, acc_g, ss, w, g, x, HAS_GATE: tl.constexpr, HAS_RMS: tl.constexpr):
        # x (x rows, 1, BLOCK_K) times the (1, BLOCK_N, BLOCK_K) chunk of W (and of the gate's G), into (x rows,
        # BLOCK_N, BLOCK_K) float32 sums; x's squares into ss
        acc += w.to(tl.float32) * x
        if HAS_GATE:
            acc_g += g.to(tl.float32) * x
        if HAS_RMS:
            ss += x * x
        return acc, acc_g, ss

    @triton.jit
    def _weight_chunk(w_ptr, g_ptr, rows, cols, k, N, K: tl.constexpr, HAS_GATE: tl.constexpr):
        # the (1, BLOCK_N, BLOCK_K) chunk of W at column k, and of the gate's G (W again when there is none); each
        # weight is read once, so not kept in L2
        offs = rows[None, :, None] * K + (k + cols)[None, None, :]
        ok = (rows[None, :, None] < N) & (k + cols < K)[None, None, :]
        w = tl.load(w_ptr + offs, mask=ok, other=0.0, eviction_policy="evict_first")
        g = w
        if HAS_GATE:
            g = tl.load(g_ptr + offs, mask=ok, other=0.0, eviction_policy="evict_first")
        return w, g

    @triton.jit
    def _gemv_kernel(w_ptr, x_ptr, b_ptr, y_ptr, g_ptr, res_ptr, N, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_RMS: tl.constexpr, EPS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr, M,
                     MP: tl.constexpr, CHUNKS: tl.constexpr = 1):
        # y (M, N) = x (M, K) @ W.T + b for a few rows of x (M <= MP * CHUNKS, MP a power of two; decode: one), MP rows
        # at a time, one pass over the program's rows of W each, so that every row's sums are the same whatever M is
        # (a verify's rows get the decode step's bits; a draft tree's 11 rows as three passes). Each program owns
        # BLOCK_N rows of W (N, K), and of the gate's G (N, K) when there is one, and walks K in wide, coalesced
        # chunks, each weight loaded once for all rows of x; fp32 accumulation in a (x rows, BLOCK_N, BLOCK_K) tile
        # whose operands are loaded 3-D, so that at one row it compiles as the 2-D GEMV did. K is a compile-time
        # constant: one specialization per layer width, with a static loop. HAS_RMS: x is the raw residual stream,
        # and W's rows already carry the RMSNorm's weight (fold_norms); every program reads all of x anyway, so it
        # sums x*x on the way and scales each row's results by its 1/rms at the end. PDL (see _pdl): the first
        # chunk of weights is loaded before waiting for the kernel before, whose output x is, so those loads
        # overlap that kernel's last wave
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, BLOCK_K)
        ms = tl.arange(0, MP)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        w, g = _weight_chunk(w_ptr, g_ptr, rows, cols, 0, N, K, HAS_GATE)
        if PDL:
            tl.extra.cuda.gdc_wait()
        for c in tl.static_range(CHUNKS):
            if c > 0:
                ms += MP
                w, g = _weight_chunk(w_ptr, g_ptr, rows, cols, 0, N, K, HAS_GATE)
            x_ok = (ms < M)[:, None, None] if MP > 1 else (ms >= 0)[:, None, None]  # one row: no mask to compute
            x = tl.load(x_ptr + ms[:, None, None] * K + cols[None, None, :], mask=x_ok & (cols < K)[None, None, :],
                        other=0.0)
            zeros = tl.zeros((MP, BLOCK_N, BLOCK_K), dtype=tl.float32)
            acc, acc_g, ss = _gemv_chunk(zeros, zeros, tl.zeros((MP, 1, BLOCK_K), dtype=tl.float32), w, g,
                                         x.to(tl.float32), HAS_GATE, HAS_RMS)
            for k in tl.range(BLOCK_K, K, BLOCK_K, num_stages=STAGES):
                w, g = _weight_chunk(w_ptr, g_ptr, rows, cols, k, N, K, HAS_GATE)
                x = tl.load(x_ptr + ms[:, None, None] * K + (k + cols)[None, None, :],
                            mask=x_ok & (k + cols < K)[None, None, :], other=0.0)
                acc, acc_g, ss = _gemv_chunk(acc, acc_g, ss, w, g, x.to(tl.float32), HAS_GATE, HAS_RMS)
            y, gate = tl.sum(acc, axis=2), tl.sum(acc_g, axis=2)  # (MP, BLOCK_N)
            if HAS_RMS:
                r = tl.rsqrt(tl.sum(tl.sum(ss, axis=2), axis=1) / K + EPS)[:, None]
                y, gate = y * r, gate * r
            _store_rows(y, gate, b_ptr, y_ptr, res_ptr, ms, rows, M, N, HAS_BIAS, HAS_GATE, HAS_RES)

    @triton.jit
    def _x_range(x_ptr, nw_ptr, K: tl.constexpr, HAS_RMS: tl.constexpr):
        # one pass over x (K,): its largest magnitude (times the norm's weight nw, with HAS_RMS), which sets its int16
        # scale, and its sum of squares for the norm. NaN counts as infinite, so that it reaches the output
        cols = tl.arange(0, 1024)
        amax, ss = tl.zeros((1024,), dtype=tl.float32), tl.zeros((1024,), dtype=tl.float32)
        for k in range(0, K, 1024):
            x = tl.load(x_ptr + k + cols, mask=k + cols < K, other=0.0).to(tl.float32)
            if HAS_RMS:
                ss += x * x
                x *= tl.load(nw_ptr + k + cols, mask=k + cols < K, other=0.0).to(tl.float32)
            a = tl.abs(x)
            amax = tl.maximum(amax, tl.where(a == a, a, float("inf")))
        return tl.max(amax, axis=0), tl.sum(ss, axis=0)

    @triton.jit
    def _bf16(v4, i: tl.constexpr):
        # the i-th of the four bfloat16 in the int64 v4, as float32 (the interpreter's path; PTX unpacks it itself)
        return (((v4 >> (16 * i)) & 0xFFFF).to(tl.int32) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _int16_pairs(x4, n4, inv, ss, HAS_RMS: tl.constexpr):
        # four bfloat16 of x, read as one int64, -> two int32 words of two int16 each, round(x * nw * inv): the
        # float 1.5 * 2**23 + v holds the integer v in its low mantissa bits, and prmt takes the low halves of two.
        # With HAS_RMS also ss + x's four squares (the int4 GEMV's norm; unused, ptxas drops them)
        if PTX:
            if HAS_RMS:
                q01, q23, ss = tl.inline_asm_elementwise(
                    "{ .reg .b32 l, h, m, n, a, b, c, d; mov.b64 {l, h}, $3; mov.b64 {m, n}, $4; "
                    "shl.b32 a, l, 16; and.b32 b, l, 0xFFFF0000; shl.b32 c, h, 16; and.b32 d, h, 0xFFFF0000; "
                    "fma.rn.f32 $2, a, a, $6; fma.rn.f32 $2, b, b, $2; fma.rn.f32 $2, c, c, $2; "
                    "fma.rn.f32 $2, d, d, $2; "
                    "shl.b32 l, m, 16; and.b32 m, m, 0xFFFF0000; shl.b32 h, n, 16; and.b32 n, n, 0xFFFF0000; "
                    "mul.f32 a, a, l; mul.f32 b, b, m; mul.f32 c, c, h; mul.f32 d, d, n; "
                    "fma.rn.f32 a, a, $5, 0f4B400000; fma.rn.f32 b, b, $5, 0f4B400000; "
                    "fma.rn.f32 c, c, $5, 0f4B400000; fma.rn.f32 d, d, $5, 0f4B400000; "
                    "prmt.b32 $0, a, b, 0x5410; prmt.b32 $1, c, d, 0x5410; }",
                    "=r,=r,=f,l,l,f,f", [x4, n4, inv, ss], dtype=(tl.int32, tl.int32, tl.float32), is_pure=True,
                    pack=1)
            else:
                q01, q23 = tl.inline_asm_elementwise(
                    "{ .reg .b32 l, h, a, b, c, d; mov.b64 {l, h}, $2; "
                    "shl.b32 a, l, 16; and.b32 b, l, 0xFFFF0000; shl.b32 c, h, 16; and.b32 d, h, 0xFFFF0000; "
                    "fma.rn.f32 a, a, $3, 0f4B400000; fma.rn.f32 b, b, $3, 0f4B400000; "
                    "fma.rn.f32 c, c, $3, 0f4B400000; fma.rn.f32 d, d, $3, 0f4B400000; "
                    "prmt.b32 $0, a, b, 0x5410; prmt.b32 $1, c, d, 0x5410; }",
                    "=r,=r,l,f", [x4, inv], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
        else:
            q = []
            for i in tl.static_range(4):
                v = _bf16(x4, i)
                if HAS_RMS:
                    ss += v * v
                    v *= _bf16(n4, i)
                q.append((v * inv + 12582912.0).to(tl.int32, bitcast=True) & 0xFFFF)
            q01, q23 = q[0] | (q[1] << 16), q[2] | (q[3] << 16)
        return q01, q23, ss

    @triton.jit
    def _pair_max(x4, n4, m, HAS_RMS: tl.constexpr):
        # m: a running largest |x * nw|, two bfloat16 packed in an int32 (NaN wins), with four more of x (an int64)
        # and of the norm's weight nw: a few bfloat16x2 instructions, no conversion to float32
        if PTX:
            if HAS_RMS:
                return tl.inline_asm_elementwise(
                    "{ .reg .b32 l, h, m, n, z; mov.b64 {l, h}, $1; mov.b64 {m, n}, $2; mov.b32 z, 0x80008000; "
                    "fma.rn.bf16x2 l, l, m, z; fma.rn.bf16x2 h, h, n, z; abs.bf16x2 l, l; abs.bf16x2 h, h; "
                    "max.NaN.bf16x2 l, l, h; max.NaN.bf16x2 $0, l, $3; }",
                    "=r,l,l,r", [x4, n4, m], dtype=tl.int32, is_pure=True, pack=1)
            return tl.inline_asm_elementwise(
                "{ .reg .b32 l, h; mov.b64 {l, h}, $1; abs.bf16x2 l, l; abs.bf16x2 h, h; "
                "max.NaN.bf16x2 l, l, h; max.NaN.bf16x2 $0, l, $2; }",
                "=r,l,r", [x4, m], dtype=tl.int32, is_pure=True, pack=1)
        a = (m << 16).to(tl.float32, bitcast=True)
        for i in tl.static_range(4):
            v = tl.abs(_bf16(x4, i) * _bf16(n4, i) if HAS_RMS else _bf16(x4, i))
            a = tl.maximum(a, tl.where(v == v, v, float("inf")))
        return ((a.to(tl.int32, bitcast=True) + 0xFFFF) >> 16) & 0xFFFF  # rounded up to a bfloat16, in the low half

    @triton.jit
    def _unpack_max(m):
        # the larger of the two bfloat16 packed in each int32 of m, as float32 (NaN -> inf: it reaches the output)
        a = tl.maximum((m << 16).to(tl.float32, bitcast=True), (m & -65536).to(tl.float32, bitcast=True))
        return tl.where(a == a, a, float("inf"))

    @triton.jit
    def _dot4(w, q01, q23, acc):
        # acc + the dot product of the four int8 in w with the four int16 in q01, q23: two dp2a instructions
        if PTX:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 t; dp2a.lo.s32.s32 t, $2, $1, $4; dp2a.hi.s32.s32 $0, $3, $1, t; }",
                "=r,r,r,r,r", [w, q01, q23, acc], dtype=tl.int32, is_pure=True, pack=1)
        return (acc + ((w << 24) >> 24) * ((q01 << 16) >> 16) + ((w << 16) >> 24) * (q01 >> 16)
                + ((w << 8) >> 24) * ((q23 << 16) >> 16) + (w >> 24) * (q23 >> 16))

    @triton.jit
    def _int8_words(w4_ptr, g4_ptr, rows, words, k, N, KW: tl.constexpr, BLOCK_W: tl.constexpr,
                    HAS_GATE: tl.constexpr):
        # the (BLOCK_W // 2, BLOCK_N, 2) int32 words (four int8 each; eight int4 for _int4_kernel) of W's rows at
        # word k, and of the gate's G (W again when there is none). Word pairs lead and rows follow so that each
        # thread loads the same two words (8 bytes) of every row, and itself the x they need: as a flat
        # (BLOCK_N, BLOCK_W) tile, Triton gives W 16 bytes a thread and x 16, and x went through shared memory to
        # meet its words, two barriers a chunk. Each weight is read once, so not kept in L2
        in_k = (k + words < KW) if KW % BLOCK_W else words >= 0
        offs = rows[None, :, None] * KW + (k + words)[:, None, :]
        ok = (rows[None, :, None] < N) & in_k[:, None, :]
        w = tl.load(w4_ptr + offs, mask=ok, other=0, eviction_policy="evict_first")
        g = w
        if HAS_GATE:
            g = tl.load(g4_ptr + offs, mask=ok, other=0, eviction_policy="evict_first")
        return w, g

    @triton.jit
    def _int8_x(x4_ptr, n4_ptr, words, k, KW: tl.constexpr, BLOCK_W: tl.constexpr, HAS_RMS: tl.constexpr):
        # x's four columns of each word at word k (an int64 of four bfloat16), and the norm's weight's (x without)
        in_k = (k + words < KW) if KW % BLOCK_W else words >= 0
        x4 = tl.load(x4_ptr + k + words, mask=in_k, other=0)
        return x4, tl.load(n4_ptr + k + words, mask=in_k, other=0) if HAS_RMS else x4

    @triton.jit
    def _int8_local_chunk(acc, acc_g, ss, w, g, x4_ptr, n4_ptr, words, k, KW: tl.constexpr, BLOCK_W: tl.constexpr,
                          HAS_RMS: tl.constexpr, HAS_GATE: tl.constexpr):
        # the chunk at word k into the float32 sums acc (and acc_g), x's squares into ss: each thread's pair of words
        # (8 columns) rounded onto int16 by those columns' own largest |x * nw| (32640, not 32767: that largest
        # product is rounded to bfloat16 on the way, 2**-9 at most), so that no pass over all of x comes first
        x4, n4 = _int8_x(x4_ptr, n4_ptr, words, k, KW, BLOCK_W, HAS_RMS)
        amax = tl.max(_unpack_max(_pair_max(x4, n4, tl.zeros(x4.shape, tl.int32), HAS_RMS)), axis=1)  # (pairs,)
        q01, q23, ss = _int16_pairs(x4, n4, (32640.0 / tl.maximum(amax, 1e-30))[:, None], ss, HAS_RMS)
        zeros = tl.zeros(w.shape, dtype=tl.int32)
        descale = (amax / 32640.0)[:, None]
        acc += tl.sum(_dot4(w, q01[:, None, :], q23[:, None, :], zeros), axis=2).to(tl.float32) * descale
        if HAS_GATE:
            acc_g += tl.sum(_dot4(g, q01[:, None, :], q23[:, None, :], zeros), axis=2).to(tl.float32) * descale
        return acc, acc_g, ss

    @triton.jit
    def _int8_gemv_chunk(acc, acc_g, w, g, x4_ptr, n4_ptr, inv, words, k, KW: tl.constexpr, BLOCK_W: tl.constexpr,
                         HAS_RMS: tl.constexpr, HAS_GATE: tl.constexpr):
        # x's four columns of each word at word k, rounded onto int16, into the int32 sums of w (and g)
        x4, n4 = _int8_x(x4_ptr, n4_ptr, words, k, KW, BLOCK_W, HAS_RMS)
        q01, q23, _ = _int16_pairs(x4, n4, inv, inv, HAS_RMS)
        acc = _dot4(w, q01[:, None, :], q23[:, None, :], acc)
        if HAS_GATE:
            acc_g = _dot4(g, q01[:, None, :], q23[:, None, :], acc_g)
        return acc, acc_g

    @triton.jit
    def _row_scales(s_ptr, gs_ptr, rows, N, HAS_GATE: tl.constexpr):
        # the float32 scales of the rows, and of the gate's (the same without one)
        sc = tl.load(s_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        return sc, tl.load(gs_ptr + rows, mask=rows < N, other=0.0).to(tl.float32) if HAS_GATE else sc

    @triton.jit
    def _int8_gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, g_ptr, gs_ptr, res_ptr, nw_ptr, N, K: tl.constexpr,
                          HAS_BIAS: tl.constexpr, HAS_RMS: tl.constexpr, EPS: tl.constexpr, HAS_GATE: tl.constexpr,
                          HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, STAGES: tl.constexpr,
                          PDL: tl.constexpr, LOCAL: tl.constexpr = False, SCALES_AHEAD: tl.constexpr = False):
        # y (N,) = (w (N, K) @ x (K,)) * s (N,) + b in integers: x scaled onto int16 by its largest magnitude, each
        # int32 word of w (four int8) times four of those in two dp2a instructions, int32 sums (each over at most
        # K / (4 BLOCK_W) words: _int8_gemv_ok keeps that under overflow) turned to float32 once at the end. The gate,
        # HAS_RMS and PDL as in _gemv_kernel (the first chunk of weights loads before the wait); the norm's weight nw
        # multiplies x before the rounding. LOCAL (INT8_LOCAL): each pair of words' 8 columns of x get their own scale
        # instead (_int8_local_chunk), summed in float32 a chunk at a time, so that no pass over x comes first.
        # SCALES_AHEAD: the rows' scales load before the wait, with the first weights
        KW: tl.constexpr = K // 4
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        words = tl.arange(0, BLOCK_W // 2)[:, None] * 2 + tl.arange(0, 2)[None, :]  # (BLOCK_W // 2, 2)
        w4_ptr = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        g4_ptr = g_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        w, g = _int8_words(w4_ptr, g4_ptr, rows, words, 0, N, KW, BLOCK_W, HAS_GATE)
        if SCALES_AHEAD:
            sc, gsc = _row_scales(s_ptr, gs_ptr, rows, N, HAS_GATE)
        if PDL:
            tl.extra.cuda.gdc_wait()
        x4_ptr = x_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
        n4_ptr = nw_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
        if LOCAL:
            zeros = tl.zeros((BLOCK_W // 2, BLOCK_N), dtype=tl.float32)
            ss = tl.zeros((BLOCK_W // 2, 2), dtype=tl.float32)
            acc, acc_g, ss = _int8_local_chunk(zeros, zeros, ss, w, g, x4_ptr, n4_ptr, words, 0, KW, BLOCK_W,
                                               HAS_RMS, HAS_GATE)
            for k in tl.range(BLOCK_W, KW, BLOCK_W, num_stages=STAGES):
                w, g = _int8_words(w4_ptr, g4_ptr, rows, words, k, N, KW, BLOCK_W, HAS_GATE)
                acc, acc_g, ss = _int8_local_chunk(acc, acc_g, ss, w, g, x4_ptr, n4_ptr, words, k, KW, BLOCK_W,
                                                   HAS_RMS, HAS_GATE)
            descale = tl.rsqrt(tl.sum(tl.sum(ss, axis=1), axis=0) / K + EPS) if HAS_RMS else 1.0
            y = tl.sum(acc, axis=0) * descale
            gate = tl.sum(acc_g, axis=0) * descale
        else:
            amax, ss = _x_range(x_ptr, nw_ptr, K, HAS_RMS)
            inv = 32766.0 / tl.maximum(amax, 1e-30)
            zeros = tl.zeros((BLOCK_W // 2, BLOCK_N, 2), dtype=tl.int32)
            acc, acc_g = _int8_gemv_chunk(zeros, zeros, w, g, x4_ptr, n4_ptr, inv, words, 0, KW, BLOCK_W, HAS_RMS,
                                          HAS_GATE)
            for k in tl.range(BLOCK_W, KW, BLOCK_W, num_stages=STAGES):
                w, g = _int8_words(w4_ptr, g4_ptr, rows, words, k, N, KW, BLOCK_W, HAS_GATE)
                acc, acc_g = _int8_gemv_chunk(acc, acc_g, w, g, x4_ptr, n4_ptr, inv, words, k, KW, BLOCK_W, HAS_RMS,
                                              HAS_GATE)
            descale = amax / 32766.0
            if HAS_RMS:
                descale *= tl.rsqrt(ss / K + EPS)
            y = tl.sum(tl.sum(acc.to(tl.float32), axis=2), axis=0) * descale
            gate = tl.sum(tl.sum(acc_g.to(tl.float32), axis=2), axis=0) * descale
        if not SCALES_AHEAD:
            sc, gsc = _row_scales(s_ptr, gs_ptr, rows, N, HAS_GATE)
        y *= sc
        if HAS_BIAS:
            y += tl.load(b_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
        if HAS_GATE:
            gate *= gsc
        y = _epilogue(y, gate, rows, rows < N, res_ptr, HAS_GATE, HAS_RES)
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)

    @triton.jit
    def _rows_rms(gram, K: tl.constexpr, EPS: tl.constexpr):
        # (16, 1): each row's 1/rms from the diagonal of x x^T, its sum of squares
        ms = tl.arange(0, 16)
        return tl.rsqrt(tl.sum(tl.where(ms[:, None] == ms[None, :], gram, 0.0), axis=1) / K + EPS)[:, None]

    @triton.jit
    def _rows_x(x_ptr, nw_ptr, ms, cols, k, M, K: tl.constexpr, HAS_NW: tl.constexpr):
        # the chunk of x's rows (16, BLOCK_K) at column k, and of the norm's weight nw (zeros past K)
        in_k = k + cols < K
        x = tl.load(x_ptr + ms[:, None] * K + (k + cols)[None, :], mask=(ms[:, None] < M) & in_k[None, :], other=0.0)
        nw = tl.load(nw_ptr + k + cols, mask=in_k, other=0.0) if HAS_NW else cols
        return x, nw

    @triton.jit
    def _rows_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, g_ptr, gs_ptr, res_ptr, nw_ptr, M, N, K: tl.constexpr,
                     HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RMS: tl.constexpr, HAS_NW: tl.constexpr,
                     EPS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
        # y (M, N) = x (M, K) @ W (N, K).T (* s (N,) for int8 W) + b for M <= 16: each program owns BLOCK_N rows of W
        # (and of the gate's G) and streams them once in pipelined BLOCK_K chunks (num_stages); the x rows, padded
        # to 16, ride along on the tensor cores. HAS_RMS as in _gemv_kernel: x goes into tl.dot as it is, the
        # diagonal of x x^T (a second, 16 x 16 dot) gives each row's sum of squares, and each row's 1/rms scales
        # that row's float32 sums at the end. HAS_NW (int8 W, which cannot carry the norm's weight): x is
        # multiplied by the norm's weight nw after its squares are taken. The compiler pipelines x only where it goes
        # straight into the dots, so with nw, x and nw are loaded by hand a chunk ahead (int8 7B verify of 6: 4.75 ->
        # 4.05 ms, H100)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ms = tl.arange(0, 16)
        cols = tl.arange(0, BLOCK_K)
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        gram = tl.zeros((16, 16), dtype=tl.float32)
        x_next, nw_next = _rows_x(x_ptr, nw_ptr, ms, cols, 0, M, K, HAS_NW)  # without HAS_NW, unused and dropped
        for k in range(0, K, BLOCK_K):
            in_k = k + cols < K
            if HAS_NW:
                x, nw = x_next, nw_next
                x_next, nw_next = _rows_x(x_ptr, nw_ptr, ms, cols, k + BLOCK_K, M, K, HAS_NW)
            else:
                x = _rows_x(x_ptr, nw_ptr, ms, cols, k, M, K, HAS_NW)[0]
            if HAS_RMS:  # x x^T on the tensor cores: its diagonal is each row's sum of squares
                gram = tl.dot(x, tl.trans(x), gram, input_precision=PRECISION)
            if HAS_NW:
                x = (x.to(tl.float32) * nw.to(tl.float32)[None, :]).to(x.dtype)
            offs, ok = rows[:, None] * K + (k + cols)[None, :], (rows[:, None] < N) & in_k[None, :]
            w = tl.load(w_ptr + offs, mask=ok, other=0, eviction_policy="evict_first")
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=PRECISION)  # int8 is exact in 16 bits
            if HAS_GATE:
                g = tl.load(g_ptr + offs, mask=ok, other=0, eviction_policy="evict_first")
                acc_g = tl.dot(x, tl.trans(g.to(x.dtype)), acc_g, input_precision=PRECISION)
        if HAS_RMS:
            r = _rows_rms(gram, K, EPS)
            acc, acc_g = acc * r, acc_g * r
        if HAS_SCALE:
            acc *= tl.load(s_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
            if HAS_GATE:
                acc_g *= tl.load(gs_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)[None, :]
        _store_rows(acc, acc_g, b_ptr, y_ptr, res_ptr, ms, rows, M, N, HAS_BIAS, HAS_GATE, HAS_RES)

    @triton.jit
    def _int4_words(w4_ptr, rows, words, k, N, KW: tl.constexpr, WPG: tl.constexpr, BLOCK_W: tl.constexpr):
        # a chunk's two pairs of words a thread: `words` in the first half of a group's words, the same WPG / 2 on
        return (_int8_words(w4_ptr, w4_ptr, rows, words, k, N, KW, BLOCK_W, False)[0],
                _int8_words(w4_ptr, w4_ptr, rows, words + WPG // 2, k, N, KW, BLOCK_W, False)[0])

    @triton.jit
    def _int4_group_offsets(rows, pair, k, N, K: tl.constexpr, GROUPSIZE: tl.constexpr):
        # (pairs, rows): where the scales and zeros of the groups of the chunk at word k are, and which exist
        group = (k + pair) // (GROUPSIZE // 8)
        return rows[None, :] * (K // GROUPSIZE) + group[:, None], (rows[None, :] < N) & (k + pair < K // 8)[:, None]

    @triton.jit
    def _int4_scales(s_ptr, z_ptr, g_offs, g_ok):
        # (pairs, rows) float32: the scales and zeros of the groups of a chunk's pairs
        return (tl.load(s_ptr + g_offs, mask=g_ok, other=0.0).to(tl.float32),
                tl.load(z_ptr + g_offs, mask=g_ok, other=0.0).to(tl.float32))

    @triton.jit
    def _int4_group_sums(d, xs, s_ptr, z_ptr, g_offs, g_ok, s=None, z=None):
        # (pairs, x rows, rows) float32: s * D + (z - 8 s) * X for each thread's four words (s, z: loaded already)
        if s is None:
            s, z = _int4_scales(s_ptr, z_ptr, g_offs, g_ok)
        s, z = s[:, None], z[:, None]
        return tl.sum(d, axis=3).to(tl.float32) * s + xs * (z - 8.0 * s)

    @triton.jit
    def _x_words(x4_ptr, n4_ptr, x_offs, n_offs, x_ok, n_ok, half: tl.constexpr, m, WPG: tl.constexpr,
                 HAS_RMS: tl.constexpr):
        # a pair's x for its words' low nibbles (half 0, 1) or high ones (2, 3), in the group's first half of columns
        # (0, 2) or its second (1, 3), and the norm's weight there; their largest |x * nw| into m
        shift = (half % 2) * (WPG // 2) + (half // 2) * WPG
        x4 = tl.load(x4_ptr + x_offs + shift, mask=x_ok, other=0)
        n4 = tl.load(n4_ptr + n_offs + shift, mask=n_ok, other=0) if HAS_RMS else x4
        return x4, n4, _pair_max(x4, n4, m, HAS_RMS)

    @triton.jit
    def _int4_chunk(acc, acc_g, ss, wa, wb, ga, gb, x4_ptr, n4_ptr, s_ptr, z_ptr, gs_ptr, gz_ptr, e_ptr, ms, M, rows,
                    pair, words, k, N, K: tl.constexpr, GROUPSIZE: tl.constexpr, BLOCK_W: tl.constexpr,
                    BLOCK_N: tl.constexpr, MP: tl.constexpr, HAS_RMS: tl.constexpr, HAS_GATE: tl.constexpr,
                    XQ: tl.constexpr, s=None, z=None, gs=None, gz=None):
        # the chunk at word k into acc (and the gate's into acc_g), x's squares into ss: per thread, x row and W row
        # 16 dp2a over its four words, then once in float32. The 32 columns of x a thread takes are rounded onto
        # int16 by their own largest magnitude (times the norm's weight nw with HAS_RMS), so that no pass over all
        # of x comes first: 32640, not 32767, because that largest product is rounded to bfloat16 (to nearest, 2**-9
        # at most). The nibbles are masked out once for all x rows. s, z, gs, gz: the chunk's scales and zeros
        # (_int4_scales), when the caller loaded them already
        KW: tl.constexpr = K // 8
        WPG: tl.constexpr = GROUPSIZE // 8
        group = (k + pair) // WPG
        lo = tl.multiple_of(group * (2 * WPG) + pair % WPG, 2)  # the pair's first-half x, as int64 words
        n_offs = (lo[:, None] + tl.arange(0, 2)[None, :])[:, None, None, :]  # (BLOCK_W // 4, 1, 1, 2)
        x_offs = ms[None, :, None, None] * (K // 4) + n_offs  # (BLOCK_W // 4, MP, 1, 2)
        n_ok = ((k + words < KW) if KW % BLOCK_W else words >= 0)[:, None, None, :]
        x_ok = n_ok if MP == 1 else (ms < M)[None, :, None, None] & n_ok
        ones = tl.full((1, 1, 1, 1), 0x01010101, tl.int32)
        d = tl.zeros((BLOCK_W // 4, MP, BLOCK_N, 2), dtype=tl.int32)
        dg = d
        xs = tl.zeros((BLOCK_W // 4, MP, 1, 2), dtype=tl.int32)
        m = tl.zeros((BLOCK_W // 4, MP, 1, 2), dtype=tl.int32)  # each pair's running largest |x * nw|, packed
        x0, n0, m = _x_words(x4_ptr, n4_ptr, x_offs, n_offs, x_ok, n_ok, 0, m, WPG, HAS_RMS)
        x1, n1, m = _x_words(x4_ptr, n4_ptr, x_offs, n_offs, x_ok, n_ok, 1, m, WPG, HAS_RMS)
        x2, n2, m = _x_words(x4_ptr, n4_ptr, x_offs, n_offs, x_ok, n_ok, 2, m, WPG, HAS_RMS)
        x3, n3, m = _x_words(x4_ptr, n4_ptr, x_offs, n_offs, x_ok, n_ok, 3, m, WPG, HAS_RMS)
        if XQ:  # x already int16 (_int4_x_kernel), its scale per group in e
            e_ok = (ms < M)[None, :, None] & (k + pair < KW)[:, None, None]  # (pairs, MP, 1)
            descale = tl.load(e_ptr + ms[None, :, None] * (K // GROUPSIZE) + group[:, None, None], mask=e_ok,
                              other=0.0)
        else:
            amax = tl.max(_unpack_max(m), axis=3)  # (pairs, MP, 1)
            inv = (32640.0 / tl.maximum(amax, 1e-30))[:, :, :, None]
            descale = amax / 32640.0
        for half in tl.static_range(4):  # the pairs' first-half columns (low nibbles), then their second-half ones
            x4, n4 = (x0, n0) if half == 0 else ((x1, n1) if half == 1 else ((x2, n2) if half == 2 else (x3, n3)))
            if XQ:
                q01, q23 = (x4 & 0xFFFFFFFF).to(tl.int32), (x4 >> 32).to(tl.int32)
            else:
                q01, q23, ss = _int16_pairs(x4, n4, inv, ss, HAS_RMS)
            w, g = (wa, ga) if half % 2 == 0 else (wb, gb)
            nibble = 4 * (half // 2)
            d = _dot4(((w >> nibble) & 0x0F0F0F0F)[:, None], q01, q23, d)
            if HAS_GATE:
                dg = _dot4(((g >> nibble) & 0x0F0F0F0F)[:, None], q01, q23, dg)
            if not XQ:
                xs = _dot4(ones, q01, q23, xs)
        if XQ:  # the sums of the thread's 32 columns of x, after the scales in e: (pairs, MP, 1)
            xs = tl.load(e_ptr + M * (K // GROUPSIZE) + ms[None, :, None] * (K // 32)
                         + (group * (GROUPSIZE // 32) + (pair % WPG) // 2)[:, None, None], mask=e_ok, other=0.0)
        else:
            xs = tl.sum(xs, axis=3).to(tl.float32)
        g_offs, g_ok = _int4_group_offsets(rows, pair, k, N, K, GROUPSIZE)  # (BLOCK_W // 4, BLOCK_N)
        acc += _int4_group_sums(d, xs, s_ptr, z_ptr, g_offs, g_ok, s, z) * descale
        if HAS_GATE:
            acc_g += _int4_group_sums(dg, xs, gs_ptr, gz_ptr, g_offs, g_ok, gs, gz) * descale
        return acc, acc_g, ss

    @triton.jit
    def _int4_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, g_ptr, gs_ptr, gz_ptr, res_ptr, nw_ptr, e_ptr, N,
                     K: tl.constexpr, GROUPSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RMS: tl.constexpr,
                     EPS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_W: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr, M, MP: tl.constexpr,
                     XQ: tl.constexpr = False, MP2: tl.constexpr = 0, SCALES_AHEAD: tl.constexpr = False):
        # y (M, N) = x (M, K) @ W.T + b for a few rows of x (M <= MP + MP2, powers of two), W (N, K) in pack_int4's
        # layout and dequantized as w = (q - 8) s + z, in integers as the int8 GEMV. One bfloat16 row: each
        # thread's 32 columns of x rounded onto int16 by their own largest magnitude (_int4_chunk), so that there is
        # no pass over x before the first weights are used. XQ: x is int16 already (_int4_x_kernel), with its
        # scales and column sums in e. An int32 word of W holds 8 weights, its low nibbles 4 columns of a group's
        # first half and its high nibbles the same 4 of its second half: two masks make them bytes 0..15, and four
        # dp2a multiply them by their 8 columns of a row of x. A thread takes two pairs of words of a group, one in
        # each half of the group's words (so that each load of a warp reads whole 32-byte sectors at g >= 128), of
        # each of its rows, and the x they need, in the int8 GEMV's tile with x's rows second (pairs, x rows, rows,
        # 2: with x's rows first, Triton spread them over threads, and the masked weights went through shared memory
        # to meet them). It sums their 16 dp2a in int32, D, and adds s * D + (z - 8 s) * X in float32, X the sum of
        # those 32 columns of x (both exact in float32: under 2**24), times their scale, once for four words; the
        # norm's sum of squares comes on the way. The weights are read and unmasked once for all rows of x; the dp2a
        # and the float work are per row, so rows cost issue slots. The gate (an int4 G with its own scales and
        # zeros), the norm, the residual and PDL as in the int8 GEMV. MP2 > 0 (XQ): x's rows MP to MP + MP2 - 1 are a
        # second block, its dp2a after the first's, so that 6 rows cost 4 + 2 rows of dp2a, not 8. SCALES_AHEAD: the
        # first chunk's scales and zeros load before the wait too, with its weights (no kernel before writes them)
        KW: tl.constexpr = K // 8
        WPG: tl.constexpr = GROUPSIZE // 8  # words a group
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        pairs = tl.arange(0, BLOCK_W // 4)
        pair = (pairs // (WPG // 4)) * WPG + (pairs % (WPG // 4)) * 2  # its first word; the other pair WPG / 2 on
        words = pair[:, None] + tl.arange(0, 2)[None, :]  # (BLOCK_W // 4, 2)
        w4_ptr = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        g4_ptr = g_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        x4_ptr = x_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
        n4_ptr = nw_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        wa, wb = _int4_words(w4_ptr, rows, words, 0, N, KW, WPG, BLOCK_W)
        ga, gb = _int4_words(g4_ptr, rows, words, 0, N, KW, WPG, BLOCK_W) if HAS_GATE else (wa, wb)
        s, z, gs, gz = None, None, None, None
        if SCALES_AHEAD:
            g_offs, g_ok = _int4_group_offsets(rows, pair, 0, N, K, GROUPSIZE)
            s, z = _int4_scales(s_ptr, z_ptr, g_offs, g_ok)
            gs, gz = _int4_scales(gs_ptr, gz_ptr, g_offs, g_ok) if HAS_GATE else (s, z)
        if PDL:
            tl.extra.cuda.gdc_wait()
        MB: tl.constexpr = max(MP2, 1)
        ms, ms2 = tl.arange(0, MP), MP + tl.arange(0, MB)
        zeros = tl.zeros((BLOCK_W // 4, MP, BLOCK_N), dtype=tl.float32)
        zeros2 = tl.zeros((BLOCK_W // 4, MB, BLOCK_N), dtype=tl.float32)
        ss = tl.zeros((BLOCK_W // 4, MP, 1, 2), dtype=tl.float32)
        acc, acc_g, ss = _int4_chunk(zeros, zeros, ss, wa, wb, ga, gb, x4_ptr, n4_ptr, s_ptr, z_ptr, gs_ptr, gz_ptr,
                                     e_ptr, ms, M, rows, pair, words, 0, N, K, GROUPSIZE, BLOCK_W, BLOCK_N, MP,
                                     HAS_RMS, HAS_GATE, XQ, s, z, gs, gz)
        acc2, acc2_g = zeros2, zeros2
        if MP2 > 0:
            acc2, acc2_g, _ = _int4_chunk(zeros2, zeros2, ss, wa, wb, ga, gb, x4_ptr, n4_ptr, s_ptr, z_ptr, gs_ptr,
                                          gz_ptr, e_ptr, ms2, M, rows, pair, words, 0, N, K, GROUPSIZE, BLOCK_W,
                                          BLOCK_N, MP2, False, HAS_GATE, XQ, s, z, gs, gz)
        for k in tl.range(BLOCK_W, KW, BLOCK_W, num_stages=STAGES):
            wa, wb = _int4_words(w4_ptr, rows, words, k, N, KW, WPG, BLOCK_W)
            ga, gb = _int4_words(g4_ptr, rows, words, k, N, KW, WPG, BLOCK_W) if HAS_GATE else (wa, wb)
            acc, acc_g, ss = _int4_chunk(acc, acc_g, ss, wa, wb, ga, gb, x4_ptr, n4_ptr, s_ptr, z_ptr, gs_ptr,
                                         gz_ptr, e_ptr, ms, M, rows, pair, words, k, N, K, GROUPSIZE, BLOCK_W,
                                         BLOCK_N, MP, HAS_RMS, HAS_GATE, XQ)
            if MP2 > 0:
                acc2, acc2_g, _ = _int4_chunk(acc2, acc2_g, ss, wa, wb, ga, gb, x4_ptr, n4_ptr, s_ptr, z_ptr, gs_ptr,
                                              gz_ptr, e_ptr, ms2, M, rows, pair, words, k, N, K, GROUPSIZE, BLOCK_W,
                                              BLOCK_N, MP2, False, HAS_GATE, XQ)
        y, gate = tl.sum(acc, axis=0), tl.sum(acc_g, axis=0)  # (MP, BLOCK_N)
        if HAS_RMS:
            r = tl.rsqrt(tl.sum(tl.sum(tl.sum(ss, axis=3), axis=2), axis=0) / K + EPS)[:, None]
            y, gate = y * r, gate * r
        _store_rows(y, gate, b_ptr, y_ptr, res_ptr, ms, rows, M, N, HAS_BIAS, HAS_GATE, HAS_RES)
        if MP2 > 0:
            _store_rows(tl.sum(acc2, axis=0), tl.sum(acc2_g, axis=0), b_ptr, y_ptr, res_ptr, ms2, rows, M, N,
                        HAS_BIAS, HAS_GATE, HAS_RES)

    @triton.jit
    def _int4_x_kernel(x_ptr, nw_ptr, q_ptr, e_ptr, xs_ptr, K: tl.constexpr, GROUPSIZE: tl.constexpr,
                       HAS_RMS: tl.constexpr, EPS: tl.constexpr, GB: tl.constexpr, PDL: tl.constexpr):
        # GB groups of one row of x a program, for the int4 GEMV over several rows (XQ): x (times the norm's weight
        # nw) rounded onto int16 by each group's largest magnitude; e, that magnitude / 32767 (times 1/rms); and xs,
        # the sums of the integers over the 32 columns each of the GEMV's threads takes (four runs of 8, a quarter
        # of the group apart), so that the GEMV only loads these, once for all its weight rows. NaN counts as
        # infinite, so that it reaches the output. With the norm, every program sums the squares of its whole row
        # (unrolled, so that its loads are all in flight at once)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()
        NG: tl.constexpr = K // GROUPSIZE
        m, g = tl.program_id(0), tl.program_id(1) * GB
        row = m.to(tl.int64) * K
        r = 1.0
        if HAS_RMS:
            cols = tl.arange(0, 1024)
            ss = tl.zeros((1024,), dtype=tl.float32)
            for k in tl.static_range(0, K, 1024):
                v = tl.load(x_ptr + row + k + cols, mask=k + cols < K, other=0.0).to(tl.float32)
                ss += v * v
            r = tl.rsqrt(tl.sum(ss, axis=0) / K + EPS)
        gs = tl.arange(0, GB)
        offs = (g + gs[:, None]) * GROUPSIZE + tl.arange(0, GROUPSIZE)[None, :]
        in_range = g + gs < NG
        ok = in_range[:, None]
        x = tl.load(x_ptr + row + offs, mask=ok, other=0.0).to(tl.float32)
        if HAS_RMS:
            x *= tl.load(nw_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        a = tl.abs(x)
        amax = tl.max(tl.where(a == a, a, float("inf")), axis=1)
        q = (x * (32767.0 / tl.maximum(amax, 1e-30))[:, None] + 12582912.0).to(tl.int32, bitcast=True)
        q = q.to(tl.int16)  # the low half: the integer
        tl.store(q_ptr + row + offs, q, mask=ok)
        tl.store(e_ptr + m * NG + g + gs, amax / 32767.0 * r, mask=in_range)
        xs = tl.sum(tl.sum(tl.reshape(q.to(tl.float32), (GB, 4, GROUPSIZE // 32, 8)), axis=3), axis=1)
        runs = (g + gs[:, None]) * (GROUPSIZE // 32) + tl.arange(0, GROUPSIZE // 32)[None, :]
        tl.store(xs_ptr + m * (K // 32) + runs, xs, mask=ok)

    @triton.jit
    def _nibbles(b, HI: tl.constexpr, OFFSET: tl.constexpr, like):
        # uint8 bytes -> OFFSET + their low nibbles and OFFSET + their high ones, exactly, in a 16-bit float dtype
        # whose OFFSET has the bit pattern HI << 8 (bfloat16: 0x43 -> 128; float16: 0x64 -> 1024): two masks and
        # one prmt for two bytes place each nibble under that exponent byte, no int-to-float conversion
        if PTX:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 l, h; and.b32 l, $4, 0x0F0F0F0F; shr.b32 h, $4, 4; and.b32 h, h, 0x0F0F0F0F; "
                "prmt.b32 $0, l, $5, 0x5140; prmt.b32 $1, l, $5, 0x7362; "
                "prmt.b32 $2, h, $5, 0x5140; prmt.b32 $3, h, $5, 0x7362; }",
                "=r,=r,=r,=r,r,r,r,r,r", [b, HI * 0x01010101], dtype=(like.dtype, like.dtype), is_pure=True, pack=4)
        return ((b & 15).to(tl.float32) + OFFSET).to(like.dtype), ((b >> 4).to(tl.float32) + OFFSET).to(like.dtype)

    @triton.jit
    def _int4_rows_group(acc, b, s, z, x_lo, x_hi, xs, HI: tl.constexpr, OFFSET: tl.constexpr):
        # acc + a group's s * D + (z - (OFFSET + 8) s) * X, D from two dots against the group's nibbles b
        w_lo, w_hi = _nibbles(b, HI, OFFSET, x_lo)
        d = tl.dot(x_hi, tl.trans(w_hi), tl.dot(x_lo, tl.trans(w_lo)))  # (16, BLOCK_N)
        return acc + d * s[None, :] + xs * (z - (OFFSET + 8.0) * s)[None, :]

    @triton.jit
    def _int4_rows_operands(x_ptr, s_ptr, z_ptr, gs_ptr, gz_ptr, nw_ptr, g, ms, j, rows, M, N, K: tl.constexpr,
                            GROUPSIZE: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RMS: tl.constexpr):
        # group g's two halves of x (16, GROUPSIZE // 2) and of the norm's weight, its scales and zeros (BLOCK_N,)
        # and the gate's
        c = g * GROUPSIZE + j[None, :]
        x_lo = tl.load(x_ptr + ms * K + c, mask=ms < M, other=0.0)
        x_hi = tl.load(x_ptr + ms * K + c + GROUPSIZE // 2, mask=ms < M, other=0.0)
        n_lo, n_hi = x_lo, x_hi
        if HAS_RMS:
            n_lo = tl.load(nw_ptr + c)
            n_hi = tl.load(nw_ptr + c + GROUPSIZE // 2)
        sz = rows * (K // GROUPSIZE) + g
        s = tl.load(s_ptr + sz, mask=rows < N, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sz, mask=rows < N, other=0.0).to(tl.float32)
        gs, gz = s, z
        if HAS_GATE:
            gs = tl.load(gs_ptr + sz, mask=rows < N, other=0.0).to(tl.float32)
            gz = tl.load(gz_ptr + sz, mask=rows < N, other=0.0).to(tl.float32)
        return x_lo, x_hi, n_lo, n_hi, s, z, gs, gz

    @triton.jit
    def _int4_rows_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, g_ptr, gs_ptr, gz_ptr, res_ptr, nw_ptr, M, N,
                          K: tl.constexpr, GROUPSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RMS: tl.constexpr,
                          EPS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr, HI: tl.constexpr,
                          OFFSET: tl.constexpr, BLOCK_N: tl.constexpr):
        # y (M, N) = x (M, K) @ W.T + b for 2 <= M <= 16 rows of 16-bit x on the tensor cores, W in pack_int4's
        # layout, a group a step: its bytes become OFFSET + q in x's dtype (_nibbles), two dots give D = x . (OFFSET
        # + q) over the group's two halves and two more against ones each row's sum X (in D's layout, no shuffles),
        # and y += s * D + (z - (OFFSET + 8) s) * X in float32. The gate, the norm and the residual as in the
        # int8 rows kernel (_rows_kernel with HAS_NW). The compiler pipelines only the weights' loads: x, the
        # norm's weight, the scales and zeros of group g + 1 are loaded by hand while group g computes (the last
        # group loads twice), else each group waits a round trip to L2 for them (7B verify of 6: 8.04 -> 5.80 ms)
        H: tl.constexpr = GROUPSIZE // 2
        NG: tl.constexpr = K // GROUPSIZE
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ms = tl.arange(0, 16)[:, None]
        j = tl.arange(0, H)
        acc = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((16, BLOCK_N), dtype=tl.float32)
        gram = tl.zeros((16, 16), dtype=tl.float32)
        ones = tl.full((H, BLOCK_N), 1.0, tl.float32).to(x_ptr.dtype.element_ty)
        nxt = _int4_rows_operands(x_ptr, s_ptr, z_ptr, gs_ptr, gz_ptr, nw_ptr, 0, ms, j, rows, M, N, K, GROUPSIZE,
                                  HAS_GATE, HAS_RMS)
        for g in range(0, NG):
            x_lo, x_hi, n_lo, n_hi, s, z, gs, gz = nxt
            nxt = _int4_rows_operands(x_ptr, s_ptr, z_ptr, gs_ptr, gz_ptr, nw_ptr, tl.minimum(g + 1, NG - 1), ms, j,
                                      rows, M, N, K, GROUPSIZE, HAS_GATE, HAS_RMS)
            offs = rows[:, None] * (K // 2) + (g * H + j)[None, :]
            b = tl.load(w_ptr + offs, mask=rows[:, None] < N, other=0, eviction_policy="evict_first")  # (BLOCK_N, H)
            if HAS_RMS:  # x x^T on the tensor cores: its diagonal is each row's sum of squares
                gram = tl.dot(x_hi, tl.trans(x_hi), tl.dot(x_lo, tl.trans(x_lo), gram))
                x_lo = (x_lo.to(tl.float32) * n_lo.to(tl.float32)).to(x_lo.dtype)
                x_hi = (x_hi.to(tl.float32) * n_hi.to(tl.float32)).to(x_hi.dtype)
            xs = tl.dot(x_hi, ones, tl.dot(x_lo, ones))  # each row's sum over the group, in D's layout
            acc = _int4_rows_group(acc, b, s, z, x_lo, x_hi, xs, HI, OFFSET)
            if HAS_GATE:
                bg = tl.load(g_ptr + offs, mask=rows[:, None] < N, other=0, eviction_policy="evict_first")
                acc_g = _int4_rows_group(acc_g, bg, gs, gz, x_lo, x_hi, xs, HI, OFFSET)
        if HAS_RMS:
            r = _rows_rms(gram, K, EPS)
            acc, acc_g = acc * r, acc_g * r
        _store_rows(acc, acc_g, b_ptr, y_ptr, res_ptr, tl.arange(0, 16), rows, M, N, HAS_BIAS, HAS_GATE, HAS_RES)

    @triton.jit
    def _mma_offset(R, C, lane, NC: tl.constexpr):
        # where a lane's 16 bytes (two int64) of W's tile C in tile row R start (quantize.shuffle_int4's layout)
        return ((R * NC + C) * 32 + lane) * 2

    @triton.jit
    def _mma_words(w64, R, C, lane, NC: tl.constexpr):
        # a lane's two int64 of W's tile C in tile row R
        wo = _mma_offset(R, C, lane, NC)
        return (tl.load(w64 + wo, eviction_policy="evict_first"),
                tl.load(w64 + wo + 1, eviction_policy="evict_first"))

    @triton.jit
    def _mma_load(w64, g64, x64, n64, R, step, lane, x_off, n_off, ok, x_ok, NC: tl.constexpr, TPS: tl.constexpr,
                  HAS_GATE: tl.constexpr, HAS_RMS: tl.constexpr):
        # a step's TPS tiles: per tile the lane's words of W (and of the gate's G) and its 16 columns of x (and of
        # the norm's weight), four int64; W's address clamped in range where not ok, x's zeros voiding it
        C0 = TPS * tl.minimum(step, NC // TPS - 1)
        v = ()
        for ti in tl.static_range(TPS):
            v = v + _mma_words(w64, R, C0 + ti, lane, NC)
            if HAS_GATE:
                v = v + _mma_words(g64, R, C0 + ti, lane, NC)
            v = v + _mma_x(x64, n64, step * TPS + ti, x_off, n_off, ok, x_ok, HAS_RMS)
        return v

    @triton.jit
    def _mma_prefetch(w64, R, step, lane, NC: tl.constexpr, TPS: tl.constexpr):
        # ask L2 for a step's words of W (the lines a later load reads; decode_attention.py has its own copy)
        for ti in tl.static_range(TPS):
            ptrs = w64 + _mma_offset(R, TPS * step + ti, lane, NC)
            tl.inline_asm_elementwise("{ prefetch.global.L2 [$1]; mov.u32 $0, 0; }", "=r,l", [ptrs],
                                      dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _mma_x(x64, n64, C, x_off, n_off, ok, x_ok, HAS_RMS: tl.constexpr):
        # a lane's 16 columns of x's row (zeros past M or past K) in tile C, and of the norm's weight
        xo, no, xm = x_off + C * 16, n_off + C * 16, ok & x_ok
        v = (tl.load(x64 + xo, mask=xm, other=0), tl.load(x64 + xo + 1, mask=xm, other=0),
             tl.load(x64 + xo + 2, mask=xm, other=0), tl.load(x64 + xo + 3, mask=xm, other=0))
        if HAS_RMS:
            v = v + (tl.load(n64 + no, mask=ok, other=0), tl.load(n64 + no + 1, mask=ok, other=0),
                     tl.load(n64 + no + 2, mask=ok, other=0), tl.load(n64 + no + 3, mask=ok, other=0))
        return v

    @triton.jit
    def _mma_tile(v, i: tl.constexpr, acc, ASM: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RMS: tl.constexpr,
                  SPLIT: tl.constexpr, F16: tl.constexpr):
        # the lane's part of one tile (v[i:], as _mma_load laid them out) into the sums acc: D (and the gate's), X
        # (and x's Gram for the norm), through ASM (mma_asm: its code, then its operands' constraints)
        N_IN: tl.constexpr = 6 + 2 * HAS_GATE + 4 * HAS_RMS
        N_ACC: tl.constexpr = 8 + 4 * HAS_GATE + 4 * HAS_RMS
        if PTX:
            out = tl.inline_asm_elementwise(ASM[0], ASM[1], v[i:i + N_IN] + acc, dtype=(tl.float32,) * N_ACC,
                                            is_pure=True, pack=1)
        else:
            out = _mma_tile_emulated(v, i, acc, HAS_GATE, HAS_RMS, SPLIT, F16)
        return out

    @triton.jit
    def _half(v4, i: tl.constexpr, F16: tl.constexpr):
        # the i-th 16-bit float of the int64 v4, as float32
        bits = (v4 >> (16 * i)) & 0xFFFF
        if F16:
            return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _round16(v, F16: tl.constexpr):
        # float32 v rounded to x's 16-bit float, as float32
        return v.to(tl.float16).to(tl.float32) if F16 else v.to(tl.bfloat16).to(tl.float32)

    @triton.jit
    def _lanes_mma(a, b, S: tl.constexpr):
        # one m16n8k16 mma's sums over a k-pair of values a lane holds: a (32 S,) the A value of each lane (row g,
        # its t), b the B value (x's row g, its t) -> (S, 8 weight rows, 8 x rows), summed over the 4 lanes t
        a3, b3 = tl.reshape(a, (S, 8, 4)), tl.reshape(b, (S, 8, 4))
        return tl.sum(a3[:, :, None, :] * b3[:, None, :, :], axis=3)

    @triton.jit
    def _lanes_c(c, S: tl.constexpr):
        # (S, 8 rows g, 8 x rows n) -> the two C values each lane (g, t) holds, x rows 2t and 2t + 1: (32 S,) each
        c0, c1 = tl.split(tl.reshape(c, (S, 8, 4, 2)))
        return tl.reshape(c0, (32 * S,)), tl.reshape(c1, (32 * S,))

    @triton.jit
    def _mma_emulated(word_bits, b, S: tl.constexpr, ONES: tl.constexpr, OFFSET: tl.constexpr):
        # C of one m16n8k16 mma, the interpreter's way: A from a lane's 32-bit word (four registers of two 16-bit
        # floats OFFSET + q, (word >> 4i) & 0x000F000F) or all ones, B the lane's four x values b[0..3] (k pairs
        # 2t, 2t+1 then 2t+8, 2t+9) -> (c0, c1, c2, c3): rows g, g, g + 8, g + 8, x rows 2t, 2t + 1, 2t, 2t + 1
        lo, hi = tl.zeros((S, 8, 8), dtype=tl.float32), tl.zeros((S, 8, 8), dtype=tl.float32)
        for q in tl.static_range(4):  # the lane's k: pair kh = q // 2, element e = q % 2
            kh, e = q // 2, q % 2
            for h in tl.static_range(2):  # A register h + 2 kh: row g + 8 h
                if ONES:
                    a = tl.full(b[0].shape, 1.0, tl.float32)
                else:
                    a = ((word_bits >> (4 * (h + 2 * kh) + 16 * e)) & 15).to(tl.float32) + OFFSET
                prod = _lanes_mma(a, b[q], S)
                if h == 0:
                    lo += prod
                else:
                    hi += prod
        c0, c1 = _lanes_c(lo, S)
        c2, c3 = _lanes_c(hi, S)
        return c0, c1, c2, c3

    @triton.jit
    def _mma_tile_emulated(v, i: tl.constexpr, acc, HAS_GATE: tl.constexpr, HAS_RMS: tl.constexpr,
                           S: tl.constexpr, F16: tl.constexpr):
        # mma_asm's tile in tensor arithmetic, for the interpreter: the same operands, the same sums (in another
        # order), the norm's product x * nw rounded to x's 16-bit float as fma.rn does
        OFFSET: tl.constexpr = 1024.0 if F16 else 128.0
        d, dg, e = acc[0:4], acc[4:8], acc[4 + 4 * HAS_GATE:8 + 4 * HAS_GATE]
        q = acc[8 + 4 * HAS_GATE:12 + 4 * HAS_GATE] if HAS_RMS else e
        xi: tl.constexpr = i + 2 + 2 * HAS_GATE
        for j in tl.static_range(4):
            w = (v[i + j // 2] >> (32 * (j % 2))) & 0xFFFFFFFF
            x4 = v[xi + j]
            b = (_half(x4, 0, F16), _half(x4, 1, F16), _half(x4, 2, F16), _half(x4, 3, F16))
            if HAS_RMS:
                zero = tl.zeros_like(b[0])
                lo = tl.zeros((S, 8, 8), dtype=tl.float32)
                for k in tl.static_range(4):  # x x^T: A is the lane's own x (row g), rows g + 8 zero
                    lo += _lanes_mma(b[k], b[k], S)
                c0, c1 = _lanes_c(lo, S)
                q = (q[0] + c0, q[1] + c1, q[2] + zero, q[3] + zero)
                n4 = v[xi + 4 + j]
                nt = (_half(n4, 0, F16), _half(n4, 1, F16), _half(n4, 2, F16), _half(n4, 3, F16))
                b = (_round16(b[0] * nt[0], F16), _round16(b[1] * nt[1], F16), _round16(b[2] * nt[2], F16),
                     _round16(b[3] * nt[3], F16))
            c = _mma_emulated(w, b, S, False, OFFSET)
            d = (d[0] + c[0], d[1] + c[1], d[2] + c[2], d[3] + c[3])
            if HAS_GATE:
                gw = (v[i + 2 + j // 2] >> (32 * (j % 2))) & 0xFFFFFFFF
                c = _mma_emulated(gw, b, S, False, OFFSET)
                dg = (dg[0] + c[0], dg[1] + c[1], dg[2] + c[2], dg[3] + c[3])
            c = _mma_emulated(w, b, S, True, OFFSET)
            e = (e[0] + c[0], e[1] + c[1], e[2] + c[2], e[3] + c[3])
        out = d
        if HAS_GATE:
            out = out + dg
        out = out + e
        if HAS_RMS:
            out = out + q
        return out

    @triton.jit
    def _mma_scale(y, d, e, s_ptr, z_ptr, rows, grp, ok, NG: tl.constexpr, SHIFT: tl.constexpr):
        # y + a group's s * D + (z - SHIFT s) * X for the lane's four sums: weight rows g, g, g + 8, g + 8
        sg = tl.load(s_ptr + rows * NG + grp, mask=ok, other=0.0).to(tl.float32)
        zg = tl.load(z_ptr + rows * NG + grp, mask=ok, other=0.0).to(tl.float32) - SHIFT * sg
        s8 = tl.load(s_ptr + (rows + 8) * NG + grp, mask=ok, other=0.0).to(tl.float32)
        z8 = tl.load(z_ptr + (rows + 8) * NG + grp, mask=ok, other=0.0).to(tl.float32) - SHIFT * s8
        return (y[0] + sg * d[0] + zg * e[0], y[1] + sg * d[1] + zg * e[1], y[2] + s8 * d[2] + z8 * e[2],
                y[3] + s8 * d[3] + z8 * e[3])

    @triton.jit
    def _mma_step(y, yg, acc, v, s_ptr, z_ptr, gs_ptr, gz_ptr, rows, k, step, ok, ASM: tl.constexpr,
                  GROUPSIZE: tl.constexpr, NG: tl.constexpr, TPS: tl.constexpr, SHIFT: tl.constexpr,
                  HAS_GATE: tl.constexpr, HAS_RMS: tl.constexpr, SPLIT: tl.constexpr, F16: tl.constexpr):
        # a step's tiles into the group sums acc, and each group's sums into y (and the gate's yg) where it ends
        TPG: tl.constexpr = GROUPSIZE // 64  # tiles a group
        PER: tl.constexpr = 6 + 2 * HAS_GATE + 4 * HAS_RMS  # loaded values a tile
        for ti in tl.static_range(TPS):
            acc = _mma_tile(v, ti * PER, acc, ASM, HAS_GATE, HAS_RMS, SPLIT, F16)
            if (TPS * k + ti + 1) % TPG == 0:  # a group ends (k's parity decides where a group spans steps)
                grp = (TPS * step + ti) // TPG
                zero = tl.zeros_like(acc[0])
                y = _mma_scale(y, acc[0:4], acc[4 + 4 * HAS_GATE:8 + 4 * HAS_GATE], s_ptr, z_ptr, rows, grp, ok, NG,
                               SHIFT)
                if HAS_GATE:
                    yg = _mma_scale(yg, acc[4:8], acc[8:12], gs_ptr, gz_ptr, rows, grp, ok, NG, SHIFT)
                acc = (zero,) * (8 + 4 * HAS_GATE) + acc[8 + 4 * HAS_GATE:]  # x's Gram runs on
        return y, yg, acc

    @triton.jit
    def _warps_sum(v, SPLIT: tl.constexpr):
        # each of the tuple v's (32 SPLIT,) sums added over the warps: (32,) a lane
        return [tl.sum(tl.reshape(a, (SPLIT, 32)), axis=0) for a in v]  # (Triton: a tuple)

    @triton.jit
    def _mma_rows_rms(q0, q1, t, K: tl.constexpr, EPS: tl.constexpr):
        # 1/rms of x's rows 2t and 2t + 1 for each lane, from the Gram sums (x x^T's diagonal entry n sits in
        # lane 4n + n // 2, its sum n % 2)
        ln = tl.arange(0, 32)
        r0, r1 = tl.zeros_like(q0), tl.zeros_like(q0)
        for n in tl.static_range(8):
            ss = tl.sum(tl.where(ln == 4 * n + n // 2, q0 if n % 2 == 0 else q1, 0.0), axis=0)
            r = tl.rsqrt(ss / K + EPS)
            r0, r1 = tl.where(2 * t == n, r, r0), tl.where(2 * t + 1 == n, r, r1)
        return r0, r1

    @triton.jit
    def _int4_mma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, g_ptr, gs_ptr, gz_ptr, res_ptr, nw_ptr, M, N,
                         K: tl.constexpr, GROUPSIZE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RMS: tl.constexpr,
                         EPS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RES: tl.constexpr, SPLIT: tl.constexpr,
                         TPS: tl.constexpr, ASM: tl.constexpr, SHIFT: tl.constexpr, PDL: tl.constexpr,
                         F16: tl.constexpr = False):
        # y (M <= 8, N) = x (M, K) @ W.T + b, W in quantize.shuffle_int4's layout, on the tensor cores through
        # mma.sync (ASM, mma_asm): each program one tile row R of W (16 rows), its SPLIT warps K in ranges of SPW
        # steps of TPS tiles of 64 columns, each step's loads issued a step ahead, two steps a trip (no register
        # copies). A lane's 16 bytes of a tile become the A operand of four m16n8k16 mma (a mask and an OR a pair
        # of weights: bfloat16 OFFSET + q), x's 16 columns of its row g its B operand; D over OFFSET + q and X (x's
        # sums, an mma with ones) add s * D + (z - SHIFT s) * X to y where a group ends, SHIFT = OFFSET + 8. With
        # HAS_RMS x is multiplied by the norm's weight in the mma's operands, and x x^T (one more mma) gives each
        # row's 1/rms at the end. The warps' sums meet at the end; the gate, residual and PDL as in the GEMVs
        NC: tl.constexpr = K // 64
        NS: tl.constexpr = NC // TPS
        NG: tl.constexpr = K // GROUPSIZE
        MULT: tl.constexpr = max(2, GROUPSIZE // (64 * TPS))  # a warp's steps: whole trips and whole groups
        SPW: tl.constexpr = (NS + MULT * SPLIT - 1) // (MULT * SPLIT) * MULT
        N_ACC: tl.constexpr = 8 + 4 * HAS_GATE + 4 * HAS_RMS
        R = tl.program_id(0)
        i = tl.arange(0, 32 * SPLIT)
        lane, warp = i % 32, i // 32
        g, t = lane >> 2, lane & 3
        rows = R * 16 + g
        w64 = w_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
        g64 = g_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
        x64 = x_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
        n64 = nw_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
        x_off, n_off, x_ok = g * (K // 4) + 4 * t, 4 * t, g < M  # int64 words of 4 columns
        first = warp * SPW
        zero = tl.zeros((32 * SPLIT,), dtype=tl.float32)
        y, yg, acc = (zero,) * 4, (zero,) * 4, (zero,) * N_ACC
        if PDL:  # the first step's weights on their way to L2 while the kernel that writes x finishes
            tl.extra.cuda.gdc_launch_dependents()
            _mma_prefetch(w64, R, tl.minimum(first, NS - 1), lane, NC, TPS)
            if HAS_GATE:
                _mma_prefetch(g64, R, tl.minimum(first, NS - 1), lane, NC, TPS)
            tl.extra.cuda.gdc_wait()
        a = _mma_load(w64, g64, x64, n64, R, first, lane, x_off, n_off, first < NS, x_ok, NC, TPS, HAS_GATE, HAS_RMS)
        for k in range(0, SPW, 2):
            step = first + k
            b = _mma_load(w64, g64, x64, n64, R, step + 1, lane, x_off, n_off, step + 1 < NS, x_ok, NC, TPS, HAS_GATE,
                          HAS_RMS)
            y, yg, acc = _mma_step(y, yg, acc, a, s_ptr, z_ptr, gs_ptr, gz_ptr, rows, k, step, step < NS, ASM,
                                   GROUPSIZE, NG, TPS, SHIFT, HAS_GATE, HAS_RMS, SPLIT, F16)
            a = _mma_load(w64, g64, x64, n64, R, step + 2, lane, x_off, n_off, (step + 2 < NS) & (k + 2 < SPW),
                          x_ok, NC, TPS, HAS_GATE, HAS_RMS)
            y, yg, acc = _mma_step(y, yg, acc, b, s_ptr, z_ptr, gs_ptr, gz_ptr, rows, k + 1, step + 1,
                                   step + 1 < NS, ASM, GROUPSIZE, NG, TPS, SHIFT, HAS_GATE, HAS_RMS, SPLIT, F16)
        ln = tl.arange(0, 32)
        r, n = R * 16 + (ln >> 2), 2 * (ln & 3)  # each lane's weight row (and r + 8) and x rows n, n + 1
        ys = _warps_sum(y, SPLIT)
        gs = _warps_sum(yg, SPLIT) if HAS_GATE else ys
        if HAS_RMS:
            q = _warps_sum(acc[N_ACC - 4:N_ACC - 2], SPLIT)
            r0, r1 = _mma_rows_rms(q[0], q[1], ln & 3, K, EPS)
            ys = (ys[0] * r0, ys[1] * r1, ys[2] * r0, ys[3] * r1)
            gs = (gs[0] * r0, gs[1] * r1, gs[2] * r0, gs[3] * r1)
        for j in tl.static_range(4):
            rj, nj = r + 8 * (j // 2), n + j % 2
            v = ys[j]
            if HAS_BIAS:
                v += tl.load(b_ptr + rj).to(tl.float32)
            offs, ok = nj * N + rj, nj < M
            v = _epilogue(v, gs[j], offs, ok, res_ptr, HAS_GATE, HAS_RES)
            tl.store(y_ptr + offs, v.to(y_ptr.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=None)  # built once a variant, not at every call
def mma_asm(gate: bool = False, rms: bool = False, float16: bool = False) -> tuple:
    """The PTX of one lane's 64-column tile for _int4_mma_kernel: four k-steps of 16, each W's word j made the A
    operand (four registers of two 16-bit floats OFFSET + q: the word shifted by 0, 4, 8, 12, masked to one nibble
    a half, OR'd under OFFSET's exponent byte), x's 4 columns the B operand, and an m16n8k16 mma into D, one for the
    gate's G into its D, and one with A all ones into X (each of x's rows summed). With rms, first x x^T with A =
    x's own row (the Gram, raw x), then x times the norm's weight. Operands: outputs D, (G's D), X, (Gram), four
    floats each; inputs W's words (two int64), (G's), x (four int64), (the norm's weight), then the sums. Returns
    the code and the operands' constraints."""
    kind = "f16" if float16 else "bf16"
    magic, one = ("0x64006400", "0x3C003C00") if float16 else ("0x43004300", "0x3F803F80")
    mma = f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32"
    n_out = 8 + 4 * gate + 4 * rms
    n_in = 6 + 2 * gate + 4 * rms
    d, dg = [f"${i}" for i in range(4)], [f"${4 + i}" for i in range(4)]
    e = [f"${4 + 4 * gate + i}" for i in range(4)]
    q = [f"${8 + 4 * gate + i}" for i in range(4)]
    inp = iter(range(n_out, n_out + n_in))
    regs = ", ".join([f"w{i}" for i in range(4)] + [f"h{i}" for i in range(4)] + [f"b{i}" for i in range(8)]
                     + [f"m{i}" for i in range(8)] + ["a0, a1, a2, a3, t, o, z, nz"])
    body = [f"{{ .reg .b32 {regs};", f"mov.b64 {{w0, w1}}, ${next(inp)};", f"mov.b64 {{w2, w3}}, ${next(inp)};"]
    if gate:
        body += [f"mov.b64 {{h0, h1}}, ${next(inp)};", f"mov.b64 {{h2, h3}}, ${next(inp)};"]
    body += [f"mov.b64 {{b{2 * i}, b{2 * i + 1}}}, ${next(inp)};" for i in range(4)]
    if rms:
        body += [f"mov.b64 {{m{2 * i}, m{2 * i + 1}}}, ${next(inp)};" for i in range(4)]
    body += [f"mov.b32 ${i}, ${n_out + n_in + i};" for i in range(n_out)]
    body += [f"mov.b32 o, {one};", "mov.b32 z, 0;", "mov.b32 nz, 0x80008000;"]

    def operand(word):  # the four A registers of a word, 16-bit floats OFFSET + q
        ops = [f"lop3.b32 a0, {word}, 0x000F000F, {magic}, 0xEA;"]
        for i in (1, 2, 3):
            ops.append(f"shr.b32 t, {word}, {4 * i}; lop3.b32 a{i}, t, 0x000F000F, {magic}, 0xEA;")
        return ops

    def acc(c):
        return "{" + ", ".join(c) + "}"

    for j in range(4):
        b = f"{{b{2 * j}, b{2 * j + 1}}}"
        if rms:  # x x^T: A holds x's row g (rows g + 8 zero), then x times the norm's weight (fma with -0)
            body.append(f"{mma} {acc(q)}, {{b{2 * j}, z, b{2 * j + 1}, z}}, {b}, {acc(q)};")
            body += [f"fma.rn.{kind}x2 b{2 * j + i}, b{2 * j + i}, m{2 * j + i}, nz;" for i in (0, 1)]
        body += operand(f"w{j}") + [f"{mma} {acc(d)}, {{a0, a1, a2, a3}}, {b}, {acc(d)};"]
        if gate:
            body += operand(f"h{j}") + [f"{mma} {acc(dg)}, {{a0, a1, a2, a3}}, {b}, {acc(dg)};"]
        body.append(f"{mma} {acc(e)}, {{o, o, o, o}}, {b}, {acc(e)};")
    return " ".join(body) + " }", ",".join(["=f"] * n_out + ["l"] * n_in + ["f"] * n_out)


def _pdl(x) -> bool:
    """Launch the float kernels with programmatic dependent launch (Hopper and newer): a kernel may then start while
    the one before it drains its last wave, instead of after it. Each first lets the next one launch
    (gdc_launch_dependents), then waits for the previous one to finish (gdc_wait) before it reads x or writes
    anything; the one-row GEMV loads its first chunk of weights, which no kernel writes, before that wait. A float
    decode layer is GEMV, attention, GEMV, GEMV, GEMV, so most boundaries are two GEMVs. On an H200 the Llama-2-7B
    decode step went from 3.90 to 3.65 ms (BENCHMARKS.md). The one-row int8 GEMV does the same (its first chunk
    of weights before the wait): 82.6% of copy over the 7B layers against 78.5% with plain launches, one H200. The
    int8 GEMV it replaced, float products a weight, lost 5% with PDL. The one-row int4 GEMV, in the same integers,
    launches the same way (not timed yet); the int8 and int4 rows kernels launch plainly."""
    return PDL_OK and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9


def _op(fn):
    """fn as a custom op, which torch.compile calls as it is instead of tracing into it: traced, its Triton kernel
    would be launched by inductor's own launcher, which drops programmatic dependent launch. CUDA graphs capture
    the launch as Triton makes it. Every op here returns a new (..., N) tensor for x (..., K) and weight (N, ...)."""
    op = torch.library.custom_op("mtp_fast::" + fn.__name__, fn, mutates_args=())
    op.register_fake(lambda x, weight, *args, **kwargs: x.new_empty(*x.shape[:-1], weight.shape[0]))
    return op


@_op
def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
         gate: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
         rms_eps: Optional[float] = None) -> torch.Tensor:
    """x: (..., K) holding one row, weight (N, K) contiguous -> (W @ x + bias) * silu(G @ x) + residual, each part
    optional, (..., N); the gate G is a second weight like W (SwiGLU's w1 beside w3), the residual is shaped like
    the output. With rms_eps, x is first divided by its root mean square (an RMSNorm whose weight is all ones:
    fold_norms moved it into W and G)."""
    return _gemv_launch(x.contiguous(), weight, bias, x.new_empty(*x.shape[:-1], weight.shape[0]), gate, residual,
                        rms_eps, 1)


def _gemv_launch(x, weight, bias, y, gate, residual, rms_eps, M: int):
    """The GEMV kernel over M rows of x (contiguous), into y."""
    N, K = weight.shape
    pdl, cfg, mp = _pdl(x), gemv_config(N, K, gate is not None), min(triton.next_power_of_2(M), GEMV_TILE_ROWS)
    _gemv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
        weight, x, bias if bias is not None else weight, y, N=N, K=K, HAS_BIAS=bias is not None,
        HAS_RMS=rms_eps is not None, EPS=rms_eps or 0.0, **cfg,
        **_epilogue_args(x, gate, residual, scales=False), PDL=pdl, launch_pdl=pdl, M=M, MP=mp,
        CHUNKS=triton.cdiv(M, mp))
    return y


@_op
def gemm_rows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
              gate: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
              rms_eps: Optional[float] = None) -> torch.Tensor:
    """x: (..., K) holding 2..MAX_ROWS rows of bfloat16 or float16, weight (N, K) contiguous -> (..., N), as gemv
    (with rms_eps each row divided by its own root mean square); up to FLOAT_GEMV_ROWS rows of at most
    FLOAT_GEMV_MAX_K features through the GEMV."""
    N, K = weight.shape
    x2 = x.reshape(-1, K).contiguous()
    if x2.shape[0] <= FLOAT_GEMV_ROWS and K <= FLOAT_GEMV_MAX_K:
        return _gemv_launch(x2, weight, bias, x.new_empty(*x.shape[:-1], N), gate, residual, rms_eps, x2.shape[0])
    y, pdl, cfg = x.new_empty(*x.shape[:-1], N), _pdl(x), ROWS_CONFIG if K >= 4096 else SMALL_ROWS_CONFIG
    _rows_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
        x2, weight, weight, bias if bias is not None else weight, y, nw_ptr=x2, M=x2.shape[0], N=N, K=K,
        HAS_SCALE=False, HAS_BIAS=bias is not None, HAS_RMS=rms_eps is not None, HAS_NW=False, EPS=rms_eps or 0.0,
        PRECISION=_precision(x2), **cfg, **_epilogue_args(x2, gate, residual), PDL=pdl, launch_pdl=pdl)
    return y


@_op
def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None,
              gate: Optional[torch.Tensor] = None, gate_scales: Optional[torch.Tensor] = None,
              residual: Optional[torch.Tensor] = None, norm_weight: Optional[torch.Tensor] = None,
              rms_eps: Optional[float] = None) -> torch.Tensor:
    """x (M, K) contiguous, M <= MAX_ROWS; int8 weight (N, K), scales (N,) -> (M, N) in x's dtype, as gemv; the
    gate is an int8 weight with its gate_scales, like them. With norm_weight, each row of x is first put through
    the RMSNorm of that weight and rms_eps."""
    (M, K), N = x.shape, weight.shape[0]
    y, b = x.new_empty(M, N), bias if bias is not None else scales
    args = dict(HAS_BIAS=bias is not None, **_epilogue_args(x, gate, residual, gate_scales))
    cfg = INT8_CONFIG if gate is None else INT8_GATE_CONFIG
    cfg = dict(cfg, BLOCK_W=max(2, min(cfg["BLOCK_W"], triton.next_power_of_2(K // 4))))  # narrow rows: no idle lanes
    if M == 1 and _int8_gemv_ok(x, weight, norm_weight, cfg["BLOCK_W"]):
        pdl = _pdl(x)
        _int8_gemv_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](
            x, weight, scales, b, y, nw_ptr=x if norm_weight is None else norm_weight, N=N, K=K,
            HAS_RMS=norm_weight is not None, EPS=rms_eps or 0.0, **cfg, **args, PDL=pdl, LOCAL=INT8_LOCAL,
            SCALES_AHEAD=SCALES_AHEAD, launch_pdl=pdl)
        return y
    if norm_weight is not None and x.dtype == torch.float16:  # x times the norm's weight, before 1/rms, could overflow
        x, norm_weight = _rms_norm(x, norm_weight, rms_eps), None
    norm = norm_weight is not None
    _rows_kernel[(triton.cdiv(N, INT8_ROWS_CONFIG["BLOCK_N"]),)](
        x, weight, scales, b, y, nw_ptr=norm_weight if norm else x, M=M, N=N, K=K, HAS_SCALE=True, HAS_RMS=norm,
        HAS_NW=norm, EPS=rms_eps or 0.0, PRECISION=_precision(x), **INT8_ROWS_CONFIG, **args, PDL=False)
    return y


def _int8_gemv_ok(x, weight, norm_weight, block_w: int) -> bool:
    """Whether the one-row int8 GEMV can read these: bfloat16 x (and norm weight) as int64 words of four, the int8
    weight as int32 words, so K a multiple of 4 and the pointers aligned to those words. Other rows (float16 or
    float32 models, odd widths) take the rows kernel, somewhat slower at one row. Each int32 sum takes at most 128
    words of 4 products of up to 127 x 32766, under 2**31: K up to 512 block_w."""
    return (x.dtype == torch.bfloat16 and x.shape[-1] % 4 == 0 and x.data_ptr() % 8 == 0
            and x.shape[-1] <= 512 * block_w
            and weight.data_ptr() % 4 == 0
            and (norm_weight is None or (norm_weight.dtype == torch.bfloat16 and norm_weight.data_ptr() % 8 == 0)))


def _rms_norm(x, weight, eps: float):
    """The RMSNorm in torch, in float32, back in x's dtype: for rows the kernels cannot normalize themselves."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def _epilogue_args(x, gate, residual, gate_scales=None, scales=True) -> dict:
    """The kernels' gate and residual arguments (and the gate's scales, for kernels that take them); x stands in
    for a pointer a kernel does not read."""
    args = dict(g_ptr=x if gate is None else gate, HAS_GATE=gate is not None,
                res_ptr=x if residual is None else residual.contiguous(), HAS_RES=residual is not None)
    return dict(args, gs_ptr=x if gate_scales is None else gate_scales) if scales else args


@_op
def int4_gemv(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, groupsize: int,
              bias: Optional[torch.Tensor] = None, gate: Optional[torch.Tensor] = None,
              gate_scales: Optional[torch.Tensor] = None, gate_zeros: Optional[torch.Tensor] = None,
              residual: Optional[torch.Tensor] = None, norm_weight: Optional[torch.Tensor] = None,
              rms_eps: Optional[float] = None) -> torch.Tensor:
    """x (M, K_in) contiguous, M <= MAX_ROWS; packed weight (N, K/2) uint8 (or quantize.shuffle_int4's (N, K/8)
    int32 words, for the tensor cores) with scales, zeros (N, K/g), K >= K_in padded to whole groups -> (M, N) in
    x's dtype, as int8_gemv (the gate another int4 weight with its scales and zeros, in the same layout). Up to
    INT4_XQ_ROWS rows compute from x rounded to bfloat16, as torch's int4 kernels do (the GEMV in integers; from 2
    rows x is rounded onto int16 by a kernel before it); more from float16 x as it is, other x rounded to bfloat16
    (the rows kernel on the tensor cores). The shuffled layout runs _int4_mma_kernel, 8 rows a launch, from
    bfloat16 or float16 x as it is (float32 x rounded to bfloat16)."""
    (M, K_in), N, K = x.shape, weight.shape[0], weight.shape[1] * (8 if weight.dtype == torch.int32 else 2)
    y, b = x.new_empty(M, N), bias if bias is not None else scales
    mma = weight.dtype == torch.int32  # quantize.shuffle_int4's layout: the tensor cores, bfloat16 or float16 x
    xw = x if mma and x.dtype in (torch.bfloat16, torch.float16) else x.to(torch.bfloat16) if (
        M <= max(1, INT4_XQ_ROWS) or x.dtype != torch.float16) else x
    # the kernels' mean is over the padded K, and float16 x times the norm's weight, before 1/rms, could overflow
    if norm_weight is not None and (K_in != K or xw.dtype == torch.float16):
        xw, norm_weight = _rms_norm(xw, norm_weight, rms_eps), None
    if K_in != K or xw.data_ptr() % 8:  # the kernels read whole groups of x, the GEMV as int64 words
        xw = F.pad(xw, (0, K - K_in))
    nw = xw if norm_weight is None else norm_weight.to(xw.dtype).contiguous()
    args = dict(_epilogue_args(x, gate, residual, gate_scales), gz_ptr=x if gate_zeros is None else gate_zeros,
                nw_ptr=nw, K=K, GROUPSIZE=groupsize, HAS_BIAS=bias is not None, HAS_RMS=norm_weight is not None,
                EPS=rms_eps or 0.0)
    pdl = _pdl(x)
    if mma:  # 8 rows of x a launch
        cfg = int4_mma_config(N, K, gate is not None)
        asm = mma_asm(gate is not None, norm_weight is not None, xw.dtype == torch.float16)
        shift = 1032.0 if xw.dtype == torch.float16 else 136.0  # OFFSET + 8
        res = args["res_ptr"].view(M, N) if residual is not None else None  # (the model's is (1, M, N))
        for m in range(0, M, INT4_MMA_ROWS):
            rows = slice(m, min(m + INT4_MMA_ROWS, M))
            _int4_mma_kernel[(N // 16,)](xw[rows], weight, scales, zeros, b, y[rows], M=rows.stop - m, N=N,
                                         **dict(args, res_ptr=res[rows] if residual is not None else x),
                                         ASM=asm, SHIFT=shift, **cfg, PDL=pdl, launch_pdl=pdl,
                                         F16=xw.dtype == torch.float16)
        return y
    if 2 <= M <= INT4_XQ_ROWS:
        # x's integers; each group's scale, then each thread's sum of its 32 columns (float32: exact under 2**24)
        q, e = torch.empty(M, K, dtype=torch.int16, device=x.device), x.new_empty(M * (K // groupsize + K // 32),
                                                                                 dtype=torch.float32)
        gb = max(1, INT4_XQ_COLUMNS // groupsize)  # groups of x a program
        _int4_x_kernel[(M, triton.cdiv(K // groupsize, gb))](xw, nw, q, e, e[M * (K // groupsize):], K=K,
                                                             GROUPSIZE=groupsize, HAS_RMS=norm_weight is not None,
                                                             EPS=rms_eps or 0.0, GB=gb, PDL=pdl, launch_pdl=pdl,
                                                             num_warps=4)
        cfg, (mp, mp2) = int4_config(K, gate is not None, M, N), xq_blocks(M)
        _int4_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](q, weight, scales, zeros, b, y, N=N, e_ptr=e,
                                                        **dict(args, HAS_RMS=False), **cfg, PDL=pdl, launch_pdl=pdl,
                                                        M=M, MP=mp, MP2=mp2, XQ=True, SCALES_AHEAD=SCALES_AHEAD)
        return y
    if M == 1:
        cfg = int4_config(K, gate is not None, 1, N)
        _int4_kernel[(triton.cdiv(N, cfg["BLOCK_N"]),)](xw, weight, scales, zeros, b, y, N=N, e_ptr=scales, **args,
                                                        **cfg, PDL=pdl, launch_pdl=pdl, M=1, MP=1,
                                                        SCALES_AHEAD=SCALES_AHEAD)
        return y
    magic = dict(HI=0x43, OFFSET=128.0) if xw.dtype == torch.bfloat16 else dict(HI=0x64, OFFSET=1024.0)
    _int4_rows_kernel[(triton.cdiv(N, INT4_ROWS_CONFIG["BLOCK_N"]),)](xw, weight, scales, zeros, b, y, M=M, N=N,
                                                                     **args, **magic, **INT4_ROWS_CONFIG)
    return y


def int4_mma_config(N: int, K: int, gate: bool = False) -> dict:
    """_int4_mma_kernel's tile for W (N, K): each program a tile row of 16 weight rows, K split over SPLIT warps,
    TPS tiles of 64 columns a step (fewer where K's tiles do not divide). Where there are 512 tile rows or more,
    INT4_MMA_GATE_CONFIG for a gate-up pair (the 7B's w1 and w3), else INT4_MMA_WIDE_CONFIG (wqkv); then
    INT4_MMA_LONG_CONFIG where K is twice N or more (w2), else INT4_MMA_CONFIG (wo)."""
    wide = INT4_MMA_GATE_CONFIG if gate else INT4_MMA_WIDE_CONFIG
    cfg = wide if N // 16 >= 512 else INT4_MMA_LONG_CONFIG if K >= 2 * N else INT4_MMA_CONFIG
    tps = cfg["TPS"]
    while (K // 64) % tps:
        tps //= 2
    return dict(SPLIT=cfg["SPLIT"], TPS=tps, num_warps=cfg["SPLIT"])


def xq_blocks(M: int) -> tuple:
    """The XQ GEMV's two blocks of x rows, powers of two up to 4 (the second 0: none): 6 rows as 4 + 2, 5 as 4 + 1,
    7 and 8 as 4 + 4."""
    mp = min(4, 1 << (M.bit_length() - 1))
    return mp, 0 if M == mp else triton.next_power_of_2(M - mp)


def int4_config(K: int, gate: bool = False, rows: int = 1, N: int = 0) -> dict:
    """The int4 GEMV's tile for W (N, K) (the gate-up pair, more than one row of x and N >= WIDE_N have their own):
    no more words a chunk than a row has, and at most a thread for four of them (INT4_CONFIG)."""
    wide = N >= WIDE_N and not gate
    if rows > 1:
        cfg = INT4_XQ_WIDE_CONFIG if wide else INT4_XQ_CONFIG
    else:
        cfg = INT4_GATE_CONFIG if gate else INT4_WIDE_CONFIG if wide else INT4_CONFIG
    block_w = min(cfg["BLOCK_W"], triton.next_power_of_2(K // 8))
    return dict(cfg, BLOCK_W=block_w, num_warps=max(1, min(cfg["num_warps"], block_w // 128)))


def gemv_config(N: int, K: int, gate: bool = False) -> dict:
    """The float GEMV's tile for W (N, K), with a gate G beside it or not, at one row of x or several."""
    if K > SMALL_K:
        return GEMV_CONFIG
    return SMALL_GATE_CONFIG if gate else SMALL_HEAD_CONFIG if N >= WIDE_N else SMALL_GEMV_CONFIG


def _precision(x) -> str:
    """tl.dot's input precision: float32 inputs exactly ("ieee", not rounded to tf32); 16-bit ones as they are."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def linear(layer, x, gate=None, residual=None, norm=None):
    """layer(norm(x)) * silu(gate(norm(x))) + residual, each part optional, for a float nn.Linear or quantize.py's
    Int8Linear, the gate a bias-free layer of the same kind and shape (SwiGLU's w1 beside w3), the norm a
    model.RMSNorm: one kernel on CUDA for up to MAX_ROWS rows; the same arithmetic in plain torch where no kernel
    here applies. The norm runs inside the kernel where `norm_inside` says it can; otherwise first, as its own
    kernel."""
    rows, w = x.numel() // x.shape[-1], getattr(layer, "weight", None)  # None: int4 repacked for torch's kernel
    g = getattr(gate, "weight", None)
    kernel = triton is not None and w is not None and x.is_cuda and rows <= MAX_ROWS and (
        gate is None or (type(gate) is type(layer) and gate.bias is None and g.shape == w.shape
                         and g.dtype == w.dtype and g.is_contiguous()
                         and getattr(gate, "groupsize", None) == getattr(layer, "groupsize", None)))
    float_kernel = (kernel and isinstance(layer, nn.Linear) and w.dtype == x.dtype and w.is_contiguous()
                    and (rows == 1 or x.dtype != torch.float32))  # rows: tuned for 16 bits; float32 stays on cuBLAS
    quant_kernel = kernel and getattr(layer, "use_triton", False)  # a prepared Int8Linear (int8) or Int4Linear (uint8)
    if norm is not None and not ((float_kernel or quant_kernel) and norm_inside(layer, norm)):
        x, norm = norm(x), None
    eps = None if norm is None else norm.eps
    if float_kernel:
        if rows == 1:
            return gemv(x, w, layer.bias, g, residual, eps)
        return gemm_rows(x, w, layer.bias, g, residual, eps)
    if quant_kernel:
        x2, nw = x.reshape(rows, -1).contiguous(), None if norm is None else norm.weight
        if w.dtype == torch.int8:
            y = int8_gemv(x2, w, layer.scales, layer.bias, g, None if gate is None else gate.scales, residual, nw, eps)
        else:
            y = int4_gemv(x2, w, layer.scales, layer.zeros, layer.groupsize, layer.bias, g,
                          *((None, None) if gate is None else (gate.scales, gate.zeros)), residual, nw, eps)
        return y.view(*x.shape[:-1], -1)
    y = F.linear(x, w, layer.bias) if type(layer) is GemvLinear else layer(x)  # (its forward is this function)
    y = y if gate is None else F.silu(gate(x)) * y
    return y if residual is None else y + residual


def norm_inside(layer, norm) -> bool:
    """Whether the kernel for `layer` can apply the RMSNorm before it: a float layer whose weights carry the norm's
    (fold_norms), or a quantized one on our kernels (Int8Linear, Int4Linear with use_triton), which multiply x by
    the norm's weight as it loads."""
    if getattr(norm, "folded", False):
        return True
    return getattr(layer, "use_triton", False) and layer.weight.dtype in (torch.int8, torch.uint8, torch.int32)


class GemvLinear(nn.Linear):
    def forward(self, x):
        return linear(self, x)


def fused_block(block, x, rope, mask, input_pos):
    """model.TransformerBlock.forward with SwiGLU's gate and up projections and the SiLU-times-up in one kernel,
    both residual adds inside the matmuls before them, and, with folded norms (fold_norms), both RMSNorms inside
    the matmuls after them where `norm_inside` allows (folded float norms; int8 weights; int4 on our kernels): five
    kernels a decode or verify layer. The same arithmetic up to rounding, each fused step computing in float32 and
    rounding once. Where the norms cannot go in at one row (int4 on torch's kernel), the residual adds stay in
    inductor's kernels, where they ride along with the next RMSNorm: inside the matmuls they made the int8 7B decode
    step 2% slower when its norms were kernels of their own (BENCHMARKS.md)."""
    attn, ffn, norm1, norm2 = block.attention, block.feed_forward, block.attention_norm, block.ffn_norm
    rows = x.shape[0] * x.shape[1]
    if rows == 1 and not (norm_inside(attn.wqkv, norm1) and norm_inside(ffn.w3, norm2)):
        h = x + attn(norm1(x), rope, mask, input_pos)
        return h + ffn.w2(linear(ffn.w3, norm2(h), gate=ffn.w1))
    h = linear(attn.wo, attn.attend(linear(attn.wqkv, x, norm=norm1), rope, mask, input_pos), residual=x)
    return linear(ffn.w2, linear(ffn.w3, h, gate=ffn.w1, norm=norm2), residual=h)


@torch.no_grad()
def fold_norms(block) -> None:
    """Move each RMSNorm's weight g into the float matmuls after it, W[:, k] * g[k], and leave the norm all ones,
    marked `folded`: the block computes the same function (up to one rounding of W * g), and the one-row GEMV can
    then normalize inside its loop, one scalar at the end, instead of in a kernel of its own. int8 weights keep
    their norms (g cannot enter a scale per output row): their one-row GEMV applies g to x instead."""
    attn, ffn = block.attention, block.feed_forward
    for norm, layers in ((block.attention_norm, [attn.wqkv]), (block.ffn_norm, [ffn.w1, ffn.w3])):
        if getattr(norm, "folded", False) or not all(
                isinstance(m, nn.Linear) and m.weight.dtype == norm.weight.dtype for m in layers):
            continue
        for m in layers:
            m.weight = nn.Parameter(m.weight * norm.weight, requires_grad=m.weight.requires_grad)
        norm.weight = nn.Parameter(torch.ones_like(norm.weight), requires_grad=norm.weight.requires_grad)
        norm.folded = True


def use_gemv(model: nn.Module) -> nn.Module:
    """Swap float nn.Linear modules for GemvLinear, sharing their parameters (tied weights stay tied), and give
    every dense model.TransformerBlock `fused_block`, on CUDA with its RMSNorm weights folded into the float
    matmuls after them (`fold_norms`: the same function in other parameters, so save no state_dict after it).
    Call it last, after quantize.prepare_for_device and tp.apply_tp: a block whose attention or feed-forward has a
    forward hook (tensor parallel's all-reduce) keeps its plain forward, since a residual added before the
    all-reduce would be summed once per rank."""
    if triton is None:
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and not isinstance(child, GemvLinear):
                new = GemvLinear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                new.weight, new.bias = child.weight, child.bias
                setattr(parent, name, new)
    for block in model.modules():
        ffn, attn = getattr(block, "feed_forward", None), getattr(block, "attention", None)
        if hasattr(block, "fused") and isinstance(getattr(ffn, "w1", None), nn.Module):  # dense, not mixture
            if not (attn._forward_hooks or ffn._forward_hooks):
                block.fused = fused_block
                if block.attention_norm.weight.is_cuda:  # where the GEMV can use it
                    fold_norms(block)
    return model
