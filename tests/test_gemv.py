"""gemv.py's Triton kernels against F.linear, on the CPU through Triton's interpreter (TRITON_INTERPRET=1)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

CHECK = r"""
import inspect, torch, torch.nn as nn, triton.runtime.interpreter as interpreter
launch = interpreter.GridExecutor.__call__
def strict_launch(self, *args, **kwargs):  # the interpreter drops keyword arguments a kernel does not take; a GPU raises
    unknown = set(kwargs) - set(inspect.getfullargspec(self.fn).args) - {"num_warps", "num_stages", "launch_pdl"}
    assert not unknown, (self.fn.__name__, unknown)
    return launch(self, *args, **kwargs)
interpreter.GridExecutor.__call__ = strict_launch
from gemv import gemm_rows, gemv, GemvLinear, use_gemv
import gemv as G
G.FLOAT_GEMV_ROWS = 1  # gemm_rows: the rows kernel at every row count, until the float GEMV's own checks below
torch.manual_seed(0)
worst = {}
for N, K, bias in [(7, 33, False), (64, 1024, True), (130, 2500, False), (2, 3000, True)]:
    for dtype, bound in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]:
        w, x = torch.randn(N, K).to(dtype), torch.randn(1, 1, K).to(dtype)
        b = torch.randn(N).to(dtype) if bias else None
        ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
        err = ((gemv(x, w, b).double() - ref).norm() / ref.norm()).item()
        assert err < bound, (N, K, dtype, err)
        worst[str(dtype)] = max(worst.get(str(dtype), 0), err)
for M, N, K, bias in [(2, 7, 33, False), (6, 64, 1024, True), (16, 130, 2500, False), (4, 2, 300, True)]:
    # the rows kernel takes 16-bit inputs; float16 here because the interpreter's bfloat16 tl.dot is wrong
    w, x = torch.randn(N, K).half(), torch.randn(1, M, K).half()
    b = torch.randn(N).half() if bias else None
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    y = gemm_rows(x, w, b)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert y.shape == ref.shape and err < 1e-3, (M, N, K, err)
    worst["rows"] = max(worst.get("rows", 0), err)
# the fused steps: y = (W @ x) * silu(G @ x) + residual, G a second weight (SwiGLU's gate), for every kernel
from gemv import int4_gemv, int8_gemv
for M, N, K in [(1, 7, 33), (1, 130, 2500), (3, 64, 300), (16, 20, 1030)]:
    x, w, g = torch.randn(M, K).half(), torch.randn(N, K).half(), torch.randn(N, K).half() / 10
    res = torch.randn(M, N).half()
    q8, s8 = torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N).half() / 100
    g8, gs8 = torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N).half() / 1000
    kernels = [("float", gemv if M == 1 else gemm_rows, w.double(), dict(gate=g), g.double()),
               ("int8", lambda x, w, b, **k: int8_gemv(x, q8, s8, b, **k), q8.double() * s8.double()[:, None],
                dict(gate=g8, gate_scales=gs8), g8.double() * gs8.double()[:, None])]
    for name, f, wd, gate, gd in kernels:
        for extra in [gate, dict(residual=res), dict(gate, residual=res)]:
            ref = torch.nn.functional.linear(x.double(), wd)
            ref = ref * torch.nn.functional.silu(x.double() @ gd.T) if "gate" in extra else ref
            ref = ref + res.double() if "residual" in extra else ref
            y = f(x, w, None, **extra)
            err = ((y.double() - ref).norm() / ref.norm()).item()
            assert y.shape == ref.shape and err < 2e-3, (name, M, N, K, list(extra), err)
            worst["fused"] = max(worst.get("fused", 0), err)
# RMSNorm inside the one-row GEMV (weights folded): W @ (x / rms(x)) + b, with the gate and the residual
for N, K, bias in [(7, 33, True), (130, 2500, False)]:
    x, w, g = torch.randn(1, K).half() * 3, torch.randn(N, K).half(), torch.randn(N, K).half() / 10
    b, res = torch.randn(N).half() if bias else None, torch.randn(1, N).half()
    xn = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    ref = torch.nn.functional.linear(xn, w.double(), None if b is None else b.double())
    ref = ref * torch.nn.functional.silu(xn @ g.double().T) + res.double()
    y = gemv(x, w, b, gate=g, residual=res, rms_eps=1e-5)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert y.shape == ref.shape and err < 2e-3, (N, K, err)
    worst["rms"] = max(worst.get("rms", 0), err)
# int8: the norm's weight applied to x as it loads (float16 x: in torch first, where x times it could overflow)
for M, N, K, dtype in [(1, 7, 33, torch.half), (1, 130, 2500, torch.half), (3, 20, 300, torch.half),
                       (3, 20, 300, torch.float), (1, 130, 2500, torch.float)]:
    x = (torch.randn(M, K) * torch.linspace(3, 6, M)[:, None]).to(dtype)
    nw = (torch.rand(K) + 0.5).to(dtype)
    q8, s8 = torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N).half() / 100
    g8, gs8 = torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N).half() / 1000
    res = torch.randn(M, N).to(dtype)
    xn = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()
    wd, gd = q8.double() * s8.double()[:, None], g8.double() * gs8.double()[:, None]
    for extra in [{}, dict(gate=g8, gate_scales=gs8, residual=res)]:
        ref = xn @ wd.T
        ref = ref * torch.nn.functional.silu(xn @ gd.T) + res.double() if extra else ref
        y = int8_gemv(x, q8, s8, None, **extra, norm_weight=nw, rms_eps=1e-5)
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert y.shape == ref.shape and err < 2e-3, ("int8", M, N, K, dtype, list(extra), err)
        worst["rms"] = max(worst.get("rms", 0), err)
# the one-row int8 GEMV in integers (bfloat16 x, K a multiple of 4; the float16 rows above took the rows kernel):
# x rounded onto int16 by its largest magnitude (with G.INT8_LOCAL, each 8 columns by their own largest), one large
# activation here
for G.INT8_LOCAL in (False, True):
    for N, K in [(7, 36), (130, 2500)]:
        x, nw = torch.randn(1, K).bfloat16() * 3, (torch.rand(K) + 0.5).bfloat16()
        x[0, 1] = 40
        q8, s8 = torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N).bfloat16() / 100
        g8, gs8 = torch.randint(-127, 128, (N, K), dtype=torch.int8), torch.rand(N).bfloat16() / 1000
        res = torch.randn(1, N).bfloat16()
        wd, gd = q8.double() * s8.double()[:, None], g8.double() * gs8.double()[:, None]
        for extra in [{}, dict(gate=g8, gate_scales=gs8, residual=res), dict(norm_weight=nw, rms_eps=1e-5),
                      dict(gate=g8, gate_scales=gs8, residual=res, norm_weight=nw, rms_eps=1e-5)]:
            xn = x.double()
            if "norm_weight" in extra:
                xn = xn * torch.rsqrt(xn.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()
            ref = xn @ wd.T
            ref = ref * torch.nn.functional.silu(xn @ gd.T) + res.double() if "gate" in extra else ref
            y = int8_gemv(x, q8, s8, None, **extra)
            G.SCALES_AHEAD = True  # the rows' scales loaded before the wait: the same bits
            assert torch.equal(int8_gemv(x, q8, s8, None, **extra), y), ("int8 scales ahead", list(extra))
            G.SCALES_AHEAD = False
            err = ((y.double() - ref).norm() / ref.norm()).item()
            err_info = ("int8 integers", G.INT8_LOCAL, N, K, list(extra), err)
            assert y.shape == ref.shape and err < 1e-2, err_info  # bfloat16 out
            worst["int8 integers"] = max(worst.get("int8 integers", 0), err)
        x[0, 5] = float("nan")  # reaches the output, as it would through float products
        assert not int8_gemv(x, q8, s8).isfinite().any()
G.INT8_LOCAL = False
# int4 (pack_int4's layout), the gate another int4 weight: 1, 3, 4 and 6 rows (the GEMV in integers, x rounded to
# bfloat16; from 2 rows rounded onto int16 first, 3 rows as blocks of 2 + 1 and 6 as 4 + 2), 16 rows in float16
# (the rows kernel; its bfloat16 tl.dot is wrong under the interpreter); 300 features pad to 320
import quantize as Q
for M, N, K, g, dtype in [(1, 24, 256, 64, torch.bfloat16), (1, 130, 2560, 128, torch.bfloat16),
                          (1, 20, 300, 32, torch.bfloat16), (3, 24, 300, 32, torch.bfloat16),
                          (4, 20, 256, 32, torch.half), (6, 40, 640, 128, torch.half), (16, 33, 512, 128, torch.half)]:
    K4 = -(-K // g) * g
    x = (torch.randn(M, K) * torch.linspace(1, 3, M)[:, None]).to(dtype)
    nw, res = (torch.rand(K) + 0.5).to(dtype), torch.randn(M, N).to(dtype)
    packed, dequantized = [], []
    for _ in range(2):  # the weight and the gate
        w = torch.nn.functional.pad(torch.randn(N, K), (0, K4 - K))
        s, z = Q.int4_qparams(w, g)
        q = Q.quantize_int4(w, s, z, g)
        packed.append((Q.pack_int4(q, g), s.to(dtype), z.to(dtype)))
        dequantized.append(Q.dequantize_int4(q, s.to(dtype).float(), z.to(dtype).float(), g)[:, :K].double())
    gate = dict(gate=packed[1][0], gate_scales=packed[1][1], gate_zeros=packed[1][2])
    for extra in [{}, gate, dict(residual=res), dict(norm_weight=nw, rms_eps=1e-5),
                  dict(gate, residual=res, norm_weight=nw, rms_eps=1e-5)]:
        xn = x.double()
        if "norm_weight" in extra:
            xn = xn * torch.rsqrt(xn.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.double()
        ref = xn @ dequantized[0].T
        ref = ref * torch.nn.functional.silu(xn @ dequantized[1].T) if "gate" in extra else ref
        ref = ref + res.double() if "residual" in extra else ref
        y = int4_gemv(x, *packed[0], g, None, **extra)
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert y.shape == ref.shape and err < 1e-2, ("int4", M, N, K, g, list(extra), err)
        if M in (1, 6) and "gate" in extra:  # the GEMV with its first scales and zeros loaded before the wait
            G.SCALES_AHEAD = True
            assert torch.equal(int4_gemv(x, *packed[0], g, None, **extra), y), ("int4 scales ahead: other bits", M)
            G.SCALES_AHEAD = False
        worst["int4 fused"] = max(worst.get("int4 fused", 0), err)
    x[0, K // 2] = float("nan")  # reaches every output of its row (the GEMV: through its 32 columns' scale)
    assert not int4_gemv(x, *packed[0], g, None)[0].isfinite().any()
for M, N, K in [(3, 20, 300), (16, 130, 1030)]:  # the rows kernel: each row its own rms
    x = torch.randn(M, K).half() * torch.linspace(0.5, 4, M).half()[:, None]
    w, g, res = torch.randn(N, K).half(), torch.randn(N, K).half() / 10, torch.randn(M, N).half()
    xn = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    ref = (xn @ w.double().T) * torch.nn.functional.silu(xn @ g.double().T) + res.double()
    y = gemm_rows(x, w, gate=g, residual=res, rms_eps=1e-5)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert y.shape == ref.shape and err < 2e-3, (M, N, K, err)
    worst["rms"] = max(worst.get("rms", 0), err)
G.FLOAT_GEMV_ROWS = 4  # the float GEMV over a few rows (gemm_rows' default where K <= 2048), fused steps too
for M, N, K, bias in [(2, 7, 33, True), (3, 130, 2000, False), (4, 20, 300, True)]:
    x = (torch.randn(M, K) * torch.linspace(0.5, 4, M)[:, None]).bfloat16()
    w, g, res = torch.randn(N, K).bfloat16(), torch.randn(N, K).bfloat16() / 10, torch.randn(M, N).bfloat16()
    b = torch.randn(N).bfloat16() if bias else None
    for extra in [{}, dict(gate=g, residual=res, rms_eps=1e-5)]:
        xn = x.double()
        if extra:
            xn = xn * torch.rsqrt(xn.pow(2).mean(-1, keepdim=True) + 1e-5)
        ref = torch.nn.functional.linear(xn, w.double(), None if b is None else b.double())
        ref = ref * torch.nn.functional.silu(xn @ g.double().T) + res.double() if extra else ref
        y = gemm_rows(x, w, b, **extra)
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert y.shape == ref.shape and err < 1e-2, ("float GEMV rows", M, N, K, list(extra), err)
        worst["float GEMV rows"] = max(worst.get("float GEMV rows", 0), err)
model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 8, bias=False))
use_gemv(model)
assert all(type(m) is GemvLinear for m in model) and model[0].weight.shape == (4, 8)
print("ok", worst)
"""


def test_kernel_sources_have_no_backslash():
    """torch.compile copies a Triton kernel's source (helpers included) into a string in its generated module, and
    torch 2.11 does not escape it: a backslash, even in a comment, turns into another character there and the
    compiled model fails to import (this broke the compiled int8 path once, on the GPU only)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import triton
    import decode_attention
    import gemv
    kernels = [(m.__name__, name, f) for m in (gemv, decode_attention) for name, f in vars(m).items()
               if isinstance(f, triton.JITFunction)]
    assert len(kernels) >= 8
    assert [(m, name) for m, name, f in kernels if "\\" in f.src] == []


def test_kernels_compile_for_hopper():
    """Every variant of gemv.py's kernels that the model runs compiles for sm_90 here, through Triton's compiler
    and ptxas, no GPU needed: the paths the interpreter never takes (the int8 GEMV's inline PTX) are checked on
    every run. scripts/kernel_resources.py prints what each variant takes from an SM."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import kernel_resources

    names, G = [], kernel_resources.G
    for name, fn, pointers, consts, warps, stages in kernel_resources.variants(4096):
        assert kernel_resources.compile_sm(fn, pointers, consts, warps, stages)["programs_per_sm"] >= 1, name
        names.append(name)
        if fn is G._int8_gemv_kernel:  # and with x scaled per 8 columns (gemv.INT8_LOCAL)
            assert kernel_resources.compile_sm(fn, pointers, dict(consts, LOCAL=True), warps, stages)["regs"], name
        if fn in (G._int8_gemv_kernel, G._int4_kernel):  # and with the first scales before the wait (SCALES_AHEAD)
            assert kernel_resources.compile_sm(fn, pointers, dict(consts, SCALES_AHEAD=True), warps, stages)["regs"]
    assert {"int8 GEMV + gate", "float GEMV + gate + norm", "float rows + gate", "int4 GEMV g128"} <= set(names)


# SmolLM2-135M's float matmuls, (N, K, gate, residual, norm) as the model runs them; a verify takes them through the
# one-row GEMV (K <= FLOAT_GEMV_MAX_K): wqkv, wo, the gate-up pair, w2, the output head
SMOLLM2_MATMULS = [(960, 576, False, False, True), (576, 576, False, True, False), (1536, 576, True, False, True),
                   (576, 1536, False, True, False), (49152, 576, False, False, False)]


def test_float_gemv_sums_in_one_order_at_one_row_and_several():
    """A verify of up to FLOAT_GEMV_ROWS rows must sum each row as a decode step does, so that a greedy bfloat16
    verify never parts from the target alone. The order of the GEMV's sums follows from how Triton lays its (rows,
    BLOCK_N, BLOCK_K) float32 products over registers, lanes and warps; compiled for sm_90 here, that layout must be
    the same at 1 row as at 2 and 4, for the tile gemv_config gives each of SmolLM2's matmuls. Session 43's first
    tile for w2 (1 x 512, 4 warps) spread K over 4 warps at one row and 2 at several, and parted 14 of 24 greedy
    texts on the real model (BENCHMARKS.md): it is the negative control."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import gemv as G
    import kernel_resources

    for N, K, gate, residual, norm in SMOLLM2_MATMULS:
        assert K <= G.FLOAT_GEMV_MAX_K  # a verify's rows go through the GEMV
        one, *more = kernel_resources.gemv_sum_layouts(K, G.gemv_config(N, K, gate), gate, residual, norm)
        assert one and more == [one, one], (N, K, one, more)
    one, *more = kernel_resources.gemv_sum_layouts(1536, dict(BLOCK_N=1, BLOCK_K=512, num_warps=4, STAGES=1),
                                                   residual=True)
    assert more[0] != one


def test_int4_gemv_over_6_rows_runs_the_dp2a_of_6_not_8():
    """The XQ GEMV takes 6 rows of x as blocks of 4 + 2 (gemv.xq_blocks), not padded to 8: compiled for sm_90, its
    weights' loop holds 3/4 of the dp2a (IDP) instructions of the 8-row loop, 4 a word of 8 weights and row."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import kernel_resources

    idp = {}
    for name, fn, pointers, consts, warps, stages in kernel_resources.variants(4096):
        if name in ("int4 GEMV g128 x6 XQ", "int4 GEMV g128 x8 XQ"):
            loop = kernel_resources.compile_sm(fn, pointers, dict(consts, K=1 << 16), warps, stages)
            words = consts["BLOCK_N"] * consts["BLOCK_W"] / (32 * warps)  # a thread's words a trip of the loop
            idp[name] = loop["loop_ops"]["IDP"] / words
    assert idp == {"int4 GEMV g128 x6 XQ": 4 * 6, "int4 GEMV g128 x8 XQ": 4 * 8}, idp


def test_kernels_compile_for_ampere():
    """The same variants compile for sm_80 (A100), where _pdl launches them without PDL (a Hopper feature): the
    inline PTX they use (dp2a, prmt, the bfloat16x2 maxima of the int4 GEMV) is sm_80's."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import kernel_resources

    for name, fn, pointers, consts, warps, stages in kernel_resources.variants(4096):
        r = kernel_resources.compile_sm(fn, pointers, dict(consts, PDL=False), warps, stages, capability=80)
        assert r["programs_per_sm"] >= 1, name


def run_interpreted(code: str, **env):
    """Run a script in a fresh process under Triton's interpreter (set before triton is imported); it prints ok."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent), **env)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr


def test_gemv_matches_linear_under_the_interpreter():
    run_interpreted(CHECK)


COMPILED = r"""
import torch
import gemv as G
import quantize as Q
torch.manual_seed(0)
x1, x4 = torch.randn(1, 64).half(), torch.randn(4, 64).half()
w, g, r = torch.randn(32, 64).half(), torch.randn(32, 64).half(), torch.randn(1, 32).half()
q8, s8 = torch.randint(-127, 128, (32, 64), dtype=torch.int8), torch.rand(32).half() / 100
s4, z4 = Q.int4_qparams(w.float(), 32)
q4 = Q.pack_int4(Q.quantize_int4(w.float(), s4, z4, 32), 32)
s4, z4 = s4.half(), z4.half()
calls = lambda x1, x4: [2 * y for y in (G.gemv(x1, w, None, g, r, 1e-5), G.gemm_rows(x4, w, rms_eps=1e-5),
                                         G.int8_gemv(x1, q8, s8, None, q8, s8, r),
                                         G.int8_gemv(x1, q8, s8, None, q8, s8, r, w[0], 1e-5), G.int8_gemv(x4, q8, s8),
                                         G.int4_gemv(x1, q4, s4, z4, 32), G.int4_gemv(x4, q4, s4, z4, 32))]
compiled = torch.compile(calls, fullgraph=True)(x1, x4)
assert all(torch.equal(a, b) for a, b in zip(compiled, calls(x1, x4)))
print("ok")
"""


def test_custom_ops_compile_whole():
    """The launchers are custom ops (so CUDA graphs keep their launch attribute): torch.compile takes them into
    one graph, with no break, through their fake (shape-only) versions, and gets the eager results."""
    # no inductor caches: a graph cached before a change to an op's fake version would hide it
    run_interpreted(COMPILED, TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")


def one_block(bias: bool, rows: int, int4: bool = False):
    """A tiny model's only block with its caches (int4: quantized, g32, laid out for torch's kernel), and a block
    call's inputs for `rows` new positions from 0: (block, (x, rope, mask, input_pos))."""
    import torch
    import quantize
    from conftest import tiny

    model = tiny(n_layer=1, attention_bias=bias)
    if int4:
        quantize.prepare_for_device(quantize.quantize_model(model, "int4", 32, pad=True, verbose=False)[0],
                                    int4_kernel="torch")
    model.setup_caches(1, 32)
    pos = torch.arange(rows)
    mask = torch.arange(32)[None, :] <= pos[:, None]
    rope = (model.rope_cos, model.rope_sin, pos[None])
    return model.layers[0], (torch.randn(1, rows, 32), rope, mask, pos)


def test_fused_block_is_the_block_forward():
    """gemv.fused_block rebuilds TransformerBlock.forward from the layers; where no kernel applies (here, the CPU)
    its plain-torch path must give the block's output exactly, for a float and a bias-carrying block."""
    import torch
    from gemv import fused_block

    for bias, rows in [(False, 3), (True, 3), (False, 1)]:  # verify, decode
        block, inputs = one_block(bias, rows)
        with torch.no_grad():
            assert torch.equal(fused_block(block, *inputs), block(*inputs))


def test_fused_block_takes_int4_repacked_for_torch():
    """An Int4Linear prepared for torch's kernel keeps no `weight` (it was repacked): gemv.linear, and so fused_block,
    must still run such a block (they fall back to the layer's forward), decode and verify."""
    import torch
    from gemv import fused_block

    for rows in (1, 3):
        block, inputs = one_block(False, rows, int4=True)
        assert not hasattr(block.attention.wqkv, "weight")
        with torch.no_grad():
            assert torch.equal(fused_block(block, *inputs), block(*inputs))


def test_folded_norms_keep_the_block_function():
    """fold_norms moves each RMSNorm's weight into the matmuls after it: the block, fused or not, must compute
    what it did before (float32, up to the rounding of W * g), and the norms must be left all ones."""
    import torch
    from gemv import fold_norms, fused_block

    for bias, rows in [(False, 1), (True, 1), (False, 3)]:
        block, inputs = one_block(bias, rows)
        with torch.no_grad():
            block.attention_norm.weight.uniform_(0.5, 2)
            block.ffn_norm.weight.uniform_(0.5, 2)
            before = block(*inputs)
            fold_norms(block)
            assert block.attention_norm.folded and block.ffn_norm.folded
            assert torch.equal(block.ffn_norm.weight, torch.ones(32))
            for out in (block(*inputs), fused_block(block, *inputs)):
                assert torch.allclose(out, before, atol=1e-5, rtol=1e-5), (bias, rows, (out - before).abs().max())


def test_int8_integer_gemv_takes_only_what_it_can_read():
    """The integer int8 GEMV reads x as int64 words of four bfloat16 and sums at most 128 words of products in int32:
    float16 or float32 rows, widths that are not a multiple of 4 or so wide that a sum could overflow, and unaligned
    rows go to the rows kernel instead (which takes the norm too)."""
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import gemv as G

    w = torch.zeros(8, 4096, dtype=torch.int8)
    x = torch.zeros(1, 4097, dtype=torch.bfloat16)
    assert G._int8_gemv_ok(x[:, :4096], w, None, 256)
    assert G._int8_gemv_ok(x[:, :4096], w, torch.ones(4096, dtype=torch.bfloat16), 256)
    assert not G._int8_gemv_ok(x[:, 1:], w, None, 256)  # 2 bytes past an 8-byte boundary
    assert not G._int8_gemv_ok(x[:, :4096].half(), w, None, 256)
    assert not G._int8_gemv_ok(x[:, :4096].float(), w, None, 256)
    assert not G._int8_gemv_ok(x[:, :4094], w[:, :4094], None, 256)
    assert not G._int8_gemv_ok(x[:, :4096], w, torch.ones(4096, dtype=torch.float16), 256)
    wide = 512 * 256
    for k, ok in ((wide, True), (wide + 4, False)):
        x, w = torch.zeros(1, k, dtype=torch.bfloat16), torch.zeros(1, k, dtype=torch.int8)
        assert G._int8_gemv_ok(x, w, None, 256) == ok


def test_int4_imma_probe_matches_dequantized_under_the_interpreter():
    """scripts/int4_imma_probe.py's experiment (int4 times x split into int8 halves, on the int8 tensor cores) against
    the dequantized weights at 1..8 rows: its bfloat16 output within twice bfloat16's rounding."""
    scripts = Path(__file__).resolve().parent.parent / "scripts"
    run_interpreted(f"import sys; sys.path.insert(0, {str(scripts)!r}); import torch, int4_imma_probe as P; "
                    "e = P.check('cpu', torch.bfloat16); assert e < 2 ** -7, e; print('ok', e)")


@pytest.mark.gpu
def test_cuda_gemv_kernels_match_linear():
    """Both kernels in bfloat16 on the GPU against a float64 reference, at 1 row (decode) and 2..16 (verify)."""
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gemv import MAX_ROWS, GemvLinear

    torch.manual_seed(0)
    for N, K, bias in [(7, 33, False), (576, 576, True), (1000, 1536, False), (4096, 11008, False)]:
        lin = GemvLinear(K, N, bias=bias, device="cuda", dtype=torch.bfloat16)
        for M in [1, 2, 6, MAX_ROWS]:
            x = torch.randn(1, M, K, device="cuda", dtype=torch.bfloat16)
            b = lin.bias.double() if bias else None
            ref = torch.nn.functional.linear(x.double(), lin.weight.double(), b)
            y = lin(x)
            err = ((y.double() - ref).norm() / ref.norm()).item()
            assert y.shape == ref.shape and err < 1e-2, (N, K, M, err)


@pytest.mark.gpu
def test_cuda_float_gemv_rows_are_each_rows_decode_bit_for_bit():
    """A small model's verify sends its rows through the one-row GEMV's tile (gemv_config), so each row's output is
    bit for bit what a decode step computes for it: a greedy bfloat16 verify then never parts from the target alone.
    Sums in another order still round to the same bfloat16 almost always (about one output in 10^4 flips), so each
    shape takes 32 draws of x, enough to see a reordering with near certainty. (Session 43: one draw caught a 4 x 128
    one-warp tile for the output head but missed w2's 1 x 512 x 4-warp tile, which parted texts on the real model;
    tests/test_mtp.py's CUDA test is the end-to-end check.)"""
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import gemv as G

    torch.manual_seed(0)
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    for N, K, gate, res, norm in SMOLLM2_MATMULS:
        eps = 1e-5 if norm else None
        w = torch.randn(N, K, **bf16) * 0.05
        g = torch.randn(N, K, **bf16) * 0.05 if gate else None
        for M in range(2, G.FLOAT_GEMV_ROWS + 1):
            for _ in range(32):
                x = torch.randn(M, K, **bf16)
                r = torch.randn(M, N, **bf16) if res else None
                rows = G.gemm_rows(x, w, None, g, r, eps)
                for i in range(M):
                    one = G.gemv(x[i:i + 1], w, None, g, None if r is None else r[i:i + 1], eps)
                    assert torch.equal(rows[i:i + 1], one), (N, K, M, i)


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["none", "int8", "int4", "int4-mma"])
def test_cuda_model_with_gemv_matches_linear(quant):
    """A tiny bf16 model's logits over 1 token (decode: Triton GEMVs) and 5 (verify: rows kernel), fused blocks both,
    against the plain layers, float and int8 (int4: the Triton int4 kernels against the float model of the weights
    they stand for; int4-mma: the tensor-core kernel, group size 64); then, in float32, compiled greedy generation
    gives the same tokens (int4: as the same model uncompiled, both rounding x to bfloat16 in every int4 layer)."""
    import torch
    from torch._dynamo.utils import counters
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import quantize
    from generate import compile_step, decode_one_token, generate
    from gemv import fused_block, use_gemv
    from model import ModelArgs, Transformer

    torch.manual_seed(0)
    args = ModelArgs(block_size=64, vocab_size=512, n_layer=2, n_head=4, n_local_heads=2, dim=256,
                     intermediate_size=688)
    ref = Transformer(args).to("cuda", torch.bfloat16).eval()
    fast = Transformer(args).to("cuda", torch.bfloat16).eval()
    fast.load_state_dict(ref.state_dict())
    if quant == "int8":
        ref, fast = (quantize.prepare_for_device(quantize.quantize_model(m, "int8")[0]) for m in (ref, fast))
        for m in ref.modules():
            if hasattr(m, "use_triton"):
                m.use_triton = False  # the reference: torch's dequantize-and-matmul
    if quant.startswith("int4"):  # 688 features are not whole groups: padded
        mma = quant == "int4-mma"
        fast = quantize.prepare_for_device(quantize.quantize_model(fast, "int4", 64 if mma else 32, pad=True,
                                                                   verbose=False)[0],
                                           int4_kernel="mma" if mma else "triton")
        with torch.no_grad():
            for name, m in fast.named_modules():
                if isinstance(m, quantize.Int4Linear):
                    assert (m.weight.dtype == torch.int32) == mma
                    q = quantize.unshuffle_int4(m.weight) if mma else quantize.unpack_int4(m.weight, m.groupsize)
                    w = quantize.dequantize_int4(q, m.scales.float(), m.zeros.float(), m.groupsize)[:, :m.in_features]
                    ref.get_submodule(name).weight.copy_(w)
    use_gemv(fast)
    assert all(block.fused is fused_block for block in fast.layers)
    assert all(getattr(b.ffn_norm, "folded", False) == (quant == "none") for b in fast.layers)  # float: norms in
    x = torch.randint(0, 512, (1, 12), device="cuda")
    with torch.no_grad():
        for m in (ref, fast):
            m.setup_caches(1, 64)
            m(x[:, :6], torch.arange(6, device="cuda"))  # prefill through F.linear / the rows kernel
        for pos in ([6], [7, 8, 9, 10, 11]):
            p = torch.tensor(pos, device="cuda")
            a, b = ref(x[:, p], p).float(), fast(x[:, p], p).float()
            assert ((a - b).norm() / a.norm()).item() < 2e-2, pos
    ref, fast = ref.float(), fast.float()  # int8 too: torch.compile must take the kernels (it once failed to)
    prompt = [x[0].tolist()]
    skips = counters["inductor"]["cudagraph_skips"]
    a = generate(fast, prompt, 30, decode_fn=compile_step(decode_one_token, "cuda"), max_seq_length=64)
    assert counters["inductor"]["cudagraph_skips"] == skips, "the compiled step ran without its CUDA graph"
    assert a == generate(fast if quant.startswith("int4") else ref, prompt, 30, max_seq_length=64)


@pytest.mark.gpu
def test_cuda_one_row_kernels_at_every_pipeline_depth(monkeypatch):
    """The float and int8 GEMVs with their K loops pipelined 1-4 chunks deep (STAGES), at 256- and 1024-wide
    chunks (of columns; the int8 GEMV's in words of four), against float64 references; K = 1000 leaves a masked
    tail."""
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import gemv as G

    torch.manual_seed(0)
    for N, K in [(4096, 4096), (512, 11008), (96, 1000)]:
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        q = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
        s = torch.rand(N, device="cuda", dtype=torch.bfloat16)
        ref, ref8 = x.double() @ w.double().T, (x.double() @ q.double().T) * s.double()
        for stages in (1, 2, 3, 4):
            for block_k in (256, 1024):
                for config in (G.GEMV_CONFIG, G.INT8_CONFIG):  # monkeypatch puts the shipped tiles back
                    monkeypatch.setitem(config, "STAGES", stages)
                    monkeypatch.setitem(config, *(("BLOCK_W", block_k // 4) if "BLOCK_W" in config
                                                  else ("BLOCK_K", block_k)))
                for y, r in ((G.gemv(x, w), ref), (G.int8_gemv(x, q, s), ref8)):
                    err = ((y.double() - r).norm() / r.norm()).item()
                    assert err < 1e-2, (N, K, stages, block_k, err)


def test_with_config_sets_tiles_in_process(monkeypatch, tmp_path, capsys):
    """scripts/with_config.py (how BENCHMARKS.md times a tile before it ships): each setting form reaches the module
    the script then imports, and a wrong name or value stops it with one line."""
    import decode_attention
    import gemv as G
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import with_config

    for config in (G.INT4_CONFIG, G.INT8_CONFIG, G.INT8_GATE_CONFIG):  # monkeypatch puts the shipped values back
        for key, value in list(config.items()):
            monkeypatch.setitem(config, key, value)
    monkeypatch.setattr(G, "INT4_XQ_ROWS", G.INT4_XQ_ROWS)
    monkeypatch.setattr(decode_attention, "CHUNK", decode_attention.CHUNK)
    script = tmp_path / "show.py"
    script.write_text("import sys, gemv, decode_attention\n"
                      "print(gemv.INT4_CONFIG, gemv.INT8_CONFIG['STAGES'], gemv.INT8_GATE_CONFIG['STAGES'],"
                      " gemv.INT4_XQ_ROWS, decode_attention.CHUNK, sys.argv[1:])\n")
    with_config.main([str(script), "INT4_CONFIG=4, 128, 2, 3", "INT8_CONFIG+INT8_GATE_CONFIG.STAGES=5",
                      "INT4_XQ_ROWS=0", "decode_attention.CHUNK=64", "--", "--flag"])
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == ("{'BLOCK_N': 4, 'BLOCK_W': 128, 'num_warps': 2, 'STAGES': 3} 5 5 0 64 ['--flag']"), out
    for bad, message in [("NOPE=1", "no setting 'NOPE'"), ("FOO_CONFIG.X=1", "no tile dict 'FOO_CONFIG'"),
                         ("INT4_CONFIG=1, 2", "takes 4 values"), ("INT4_XQ_ROWS=abc", "not a Python literal"),
                         ("INT4_XQ_ROWS", "has no '='")]:
        with pytest.raises(SystemExit, match=message):
            with_config.main([str(script), bad])


_MMA_SCRIPT = textwrap.dedent("""
    import torch, gemv as G, quantize as Q
    torch.manual_seed(0)
    def mat(N, K, g, dtype):
        q = torch.randint(0, 16, (N, K), dtype=torch.int32)
        return q, (torch.rand(N, K // g) / 8).to(dtype), (torch.randn(N, K // g) / 8).to(dtype)
    worst = 0.0
    bf16, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    for N, K, g, M, kind, dtype in [(32, 256, 64, 3, "plain", bf16), (32, 256, 128, 1, "norm", bf16),
                                    (48, 256, 64, 6, "gate+norm", bf16), (32, 704, 64, 5, "res", bf16),
                                    (32, 512, 256, 8, "bias", bf16), (32, 576, 64, 12, "res", bf16),
                                    (32, 256, 128, 2, "gate+norm", f16), (32, 256, 64, 1, "norm", f32)]:
        q, s, z = mat(N, K, g, dtype)
        x = torch.randn(M, K, dtype=dtype)
        xr, kw = x.float(), {}
        if "norm" in kind:
            nw = torch.rand(K, dtype=dtype) + 0.5
            kw.update(norm_weight=nw, rms_eps=1e-5)
            xr = xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-5) * nw.float()
        ref = xr @ Q.dequantize_int4(q, s.float(), z.float(), g).T
        if kind == "res":  # as the model passes it: (1, M, N); 12 rows take two launches
            res = torch.randn(1, M, N, dtype=dtype)
            kw["residual"] = res
            ref = ref + res[0].float()
        if kind == "bias":
            kw["bias"] = torch.randn(N, dtype=dtype)
            ref = ref + kw["bias"].float()
        if "gate" in kind:
            q2, s2, z2 = mat(N, K, g, dtype)
            kw.update(gate=Q.shuffle_int4(q2), gate_scales=s2, gate_zeros=z2)
            ref = ref * torch.nn.functional.silu(xr @ Q.dequantize_int4(q2, s2.float(), z2.float(), g).T)
        y = G.int4_gemv(x, Q.shuffle_int4(q), s, z, g, **kw)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        assert err < 2e-2, (N, K, g, M, kind, dtype, err)
        worst = max(worst, err)
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    x[1, 7] = float("nan")
    q, s, z = mat(32, 256, 64, torch.bfloat16)
    y = G.int4_gemv(x, Q.shuffle_int4(q), s, z, 64)
    assert y[1].isnan().all() and not y[0].isnan().any()
    print("worst", worst)
""")


def test_int4_mma_kernel_under_interpreter():
    """gemv.py's int4 tensor-core kernel (quantize.shuffle_int4's layout) under TRITON_INTERPRET=1, each mma
    emulated in tensor arithmetic: against the dequantized weights, with the norm, the gate-up pair, the residual
    as the model passes it (12 rows: two launches, the second from row 8), bias, group sizes 64-256, a tile a step
    (K = 576, 704) and two, bfloat16, float16 and float32 x; a NaN in one row of x reaches that row only."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", _MMA_SCRIPT], capture_output=True, text=True, env=env, cwd=root,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-1000:] + run.stderr[-2000:]
