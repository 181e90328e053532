"""quantize.py on tiny random models (CPU): kernels against dequantized references, quality against the float
layer, save/load round trips, greedy equality, MoE, the Triton GEMVs under Triton's interpreter, and bad input.

Error bounds, relative (max-abs error over max-abs output): int8 and int4 layers run torch's CPU kernels in
bfloat16, so they match the reference built from bfloat16-rounded inputs (and, for int4, scales and zeros) within
5e-3 (the bfloat16 output alone rounds at 2e-3); int8 layers whose input width is not a multiple of 16 dequantize
into a float32 matmul and match x @ dequantized(W).T within 1e-4; the Triton GEMVs (float32
accumulation, under the interpreter) within 1e-5 in float32, 2e-2 with bfloat16 activations. Against the float
layer: SQNR > 20 dB for int8 and for int4 at groups of 32 and 64 (Gaussian weights put int4-g128 at 20.1 dB by
arithmetic: its step is the group's range over 15).
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import quantize as Q
from generate import load_model
from model import ModelArgs, MOEFeedForward, Transformer

TINY = dict(block_size=64, vocab_size=256, n_layer=2, n_head=4, dim=128, intermediate_size=256, n_local_heads=2)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**TINY, **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def rel_err(y, ref):
    return ((y - ref).abs().max() / ref.abs().max()).item()


def sqnr(y, ref):
    return (20 * torch.log10(ref.norm() / (ref - y).norm())).item()


def dequantized_weight(m):
    """The float weights a quantized layer stands for (int4: with the bfloat16 scales and zeros its kernels use)."""
    if isinstance(m, Q.Int8Linear):
        return m.weight.float() * m.scales.float()[:, None]
    q, bf16 = Q.unpack_int4(m.weight, m.groupsize), lambda t: t.to(torch.bfloat16).float()
    return Q.dequantize_int4(q, bf16(m.scales), bf16(m.zeros), m.groupsize)[:, :m.in_features]


def quantized_linear(w, mode, groupsize=64, bias=None):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if bias is not None:
            lin.bias.copy_(bias)
    return Q._quantized_module(lin, mode, groupsize, None)


@pytest.mark.parametrize("mode,N,K,g", [("int8", 48, 96, None), ("int8", 200, 344, None), ("int4", 64, 256, 32),
                                        ("int4", 96, 192, 64), ("int4", 48, 256, 128), ("int4", 32, 512, 256)])
def test_linear_matches_dequantized_reference(mode, N, K, g):
    torch.manual_seed(N + K)
    lin = quantized_linear(torch.randn(N, K), mode, g, bias=torch.randn(N))
    ref_w = dequantized_weight(lin)
    Q.prepare_for_device(lin)
    x = torch.randn(3, 5, K)
    if mode == "int8" and K % 16:  # a width torch's int8 kernel cannot take: the float32 dequantizing matmul
        assert rel_err(lin(x), x @ ref_w.T + lin.bias) < 1e-4
    else:
        assert rel_err(lin(x), x.to(torch.bfloat16).float() @ ref_w.T + lin.bias) < 5e-3


def test_cpu_int8_rows_alone_equal_rows_together():
    # speculative verification feeds k+1 rows where decode feeds one: the int8 kernel must not tell them apart
    torch.manual_seed(0)
    lin = Q.prepare_for_device(quantized_linear(torch.randn(96, 576), "int8"))
    x = torch.randn(4, 576)
    assert torch.equal(lin(x), torch.cat([lin(row[None]) for row in x]))


@pytest.mark.parametrize("K", [1024, 1000])  # torch's CPU int8 kernel; the dequantizing F.linear (1000 % 16 != 0)
def test_int8_in_float16_does_not_overflow(K):
    """The raw int8 sums (here up to 127 x 1000) exceed float16's 65504; the scales must apply before the output is
    float16. They did not, and an int8 SmolLM2 with --dtype float16 ended every answer at its first token."""
    w = torch.full((8, K), 0.1)  # each row quantizes to 127 with a scale of 0.1 / 127
    lin = Q.prepare_for_device(quantized_linear(w, "int8").to(torch.float16))
    y = lin(torch.ones(2, K, dtype=torch.float16))
    assert torch.isfinite(y).all() and rel_err(y.float(), torch.full((2, 8), 0.1 * K)) < 5e-3


def test_sqnr_against_float_linear():
    torch.manual_seed(0)
    w, x = torch.randn(256, 512), torch.randn(64, 512)
    ref = x @ w.T
    for mode, g in (("int8", None), ("int4", 32), ("int4", 64)):
        lin = Q.prepare_for_device(quantized_linear(w, mode, g))
        assert sqnr(lin(x), ref) > 20, (mode, g)
    assert sqnr(Q.prepare_for_device(quantized_linear(w, "int8"))(x), ref) > 40


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    torch.manual_seed(0)
    K, N, g = 256, 128, 64
    mix = torch.eye(K) + 2 * torch.randn(K, K) / K ** 0.5
    x = (torch.randn(2048, K) @ mix) * torch.linspace(0.2, 3, K)  # correlated inputs of uneven scale
    w = torch.randn(N, K)
    H = x.T @ x / x.shape[0]
    ref = x @ w.T
    scales, zeros = Q.int4_qparams(w, g)
    rtn = sqnr(x @ Q.dequantize_int4(Q.quantize_int4(w, scales, zeros, g), scales, zeros, g).T, ref)
    for act_order in (False, True):
        q, scales, zeros = Q.gptq_quantize(w, H, g, act_order=act_order)
        assert q.min() >= 0 and q.max() <= 15
        assert sqnr(x @ Q.dequantize_int4(q, scales, zeros, g).T, ref) > rtn + 1, act_order


def save_checkpoint(tmp_path, model, info, name):
    """A checkpoint folder as the converter writes one: config.json beside the state dict."""
    state = model.state_dict()
    if model.config.tie_embeddings and not info.get("quantize_output"):
        state.pop("output.weight")
    state["quantization"] = info
    model.config.to_json(tmp_path / "config.json")
    torch.save(state, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("mode,groupsize,quantize_output,kw", [
    ("int8", None, True, {}), ("int4", 64, False, {}), ("int4", 128, True, dict(dim=192)),
    ("int4-gptq", 64, False, {}), ("int4-gptq", 64, True, dict(tie_embeddings=True)),
    ("int8", None, False, dict(tie_embeddings=True))])
def test_save_load_round_trip(tmp_path, mode, groupsize, quantize_output, kw):
    model = tiny_model(**kw)
    embeddings = model.tok_embeddings.weight.clone()
    tokens = torch.randint(0, 256, (2, 16))
    pad = model.config.dim % (groupsize or 1) != 0  # dim 192 with groups of 128: zero-padded
    model, info = Q.quantize_model(model, mode, groupsize or 128, tokens if mode == "int4-gptq" else None, pad=pad,
                                   quantize_output=quantize_output, verbose=False)
    assert torch.equal(model.tok_embeddings.weight, embeddings)  # a tied head is quantized apart from them
    assert json.loads(json.dumps(info)) == info  # plain data, nothing torch-specific
    assert set(info["quantized"]) >= {"layers.0.attention.wqkv", "layers.1.feed_forward.w2"}
    assert ("output" in info["quantized"]) == quantize_output
    path = save_checkpoint(tmp_path, model, info, "model_q.pth")
    Q.prepare_for_device(model)
    loaded = load_model(path, "cpu", torch.float32)
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(loaded(x), model(x))
    assert type(loaded.layers[1].attention.wqkv) is type(model.layers[1].attention.wqkv)


@pytest.mark.parametrize("mode,groupsize", [("int8", None), ("int4", 32), ("int4-gptq", 64)])
def test_greedy_output_equals_dequantized_model(mode, groupsize):
    model = tiny_model(seed=1)
    tokens = torch.randint(0, 256, (2, 16))
    quantized, _ = Q.quantize_model(model, mode, groupsize or 128, tokens if mode == "int4-gptq" else None,
                                    verbose=False)
    reference = tiny_model(seed=1)  # same float model, then the dequantized weights put back in its nn.Linear
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, (Q.Int8Linear, Q.Int4Linear)):
                reference.get_submodule(name).weight.copy_(dequantized_weight(m))
    Q.prepare_for_device(quantized)
    prompt = torch.randint(0, 256, (1, 8))
    outs = []
    for m in (quantized, reference):
        ids = prompt
        for _ in range(12):
            ids = torch.cat([ids, m(ids)[:, -1:].argmax(-1)], dim=1)
        outs.append(ids)
    assert torch.equal(*outs)


@pytest.mark.parametrize("mode,bound", [("int8", 1e-2), ("int4", 1e-2)])  # their CPU kernels run in bfloat16
def test_moe_quantizes_and_runs(mode, bound):
    model = tiny_model(num_experts=4, num_activated_experts=2)
    reference = tiny_model(num_experts=4, num_activated_experts=2)
    model, info = Q.quantize_model(model, mode, 64, verbose=False)
    assert info["quantized"]["layers.0.feed_forward"] == "int8-experts"
    assert "layers.0.feed_forward.gate" in info["skipped"]
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, Q.Int8MOEFeedForward):
                ref = reference.get_submodule(name)
                assert isinstance(ref, MOEFeedForward)
                for n in ("w1", "w3", "w2"):
                    getattr(ref, n).copy_(m.experts(n, slice(None), torch.float32))
            elif isinstance(m, (Q.Int8Linear, Q.Int4Linear)):
                reference.get_submodule(name).weight.copy_(dequantized_weight(m))
    Q.prepare_for_device(model)
    for length in (5, 24):  # decode path (<= 16 tokens) and prefill path
        x = torch.randint(0, 256, (1, length))
        assert rel_err(model(x), reference(x)) < bound


def test_bad_input_is_refused_clearly(tmp_path, capsys):
    with pytest.raises(ValueError, match="does not divide the 192 input features.*--pad"):
        Q.quantize_model(tiny_model(dim=192), "int4", 128, verbose=False)
    with pytest.raises(ValueError, match="unknown mode 'int3'"):
        Q.quantize_model(tiny_model(), "int3", 128, verbose=False)
    with pytest.raises(ValueError, match="group size 48"):
        Q.quantize_model(tiny_model(), "int4", 48, verbose=False)
    with pytest.raises(ValueError, match="needs calibration"):
        Q.quantize_model(tiny_model(), "int4-gptq", 64, verbose=False)
    model, info = Q.quantize_model(tiny_model(), "int8", verbose=False)
    with pytest.raises(ValueError, match="already quantized"):
        Q.quantize_model(model, "int4", 64, verbose=False)
    path = save_checkpoint(tmp_path, model, info, "model_int8.pth")
    run = subprocess.run([sys.executable, "quantize.py", "--checkpoint_path", str(path), "--mode", "int4"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 2 and "already quantized" in run.stderr, run.stderr
    torch.save({"config": {}, "state_dict": {}}, tmp_path / "head.pth")  # an MTP head, not a model
    for flags, message in [(["--checkpoint_path", str(tmp_path / "head.pth"), "--mode", "int8"], "an MTP head"),
                           (["--checkpoint_path", str(path), "--mode", "int4-gptq", "--samples", "0"],
                            "--samples must be at least 1"),
                           (["--checkpoint_path", str(path), "--mode", "int8", "--groupsize", "64"],
                            "--groupsize and --pad are for int4 modes"),
                           (["--checkpoint_path", str(path), "--mode", "int4", "--no-act_order", "--samples", "8"],
                            "--samples, --no-act_order: for --mode int4-gptq only; drop for --mode int4"),
                           (["--checkpoint_path", str(path), "--mode", "int4-gptq", "--calibration_file",
                             str(tmp_path / "none.txt")], f"calibration file {tmp_path / 'none.txt'} not found")]:
        with pytest.raises(SystemExit):
            Q.main(flags)
        assert message in capsys.readouterr().err
    unprepared = Q.apply_quantization(tiny_model(), info)
    with pytest.raises(RuntimeError, match="prepare_for_device"):
        Q.apply_quantization(tiny_model(), dict(info, quantized={"output": "int4"}, groupsize=64)).output(
            torch.randn(1, 128))
    assert isinstance(unprepared.layers[0].attention.wo, Q.Int8Linear)


def test_int4_packing_round_trips_and_pairs_half_groups():
    torch.manual_seed(0)
    q = torch.randint(0, 16, (4, 256), dtype=torch.int32)
    packed = Q.pack_int4(q, 64)
    assert packed.shape == (4, 128) and packed.dtype == torch.uint8
    assert torch.equal(Q.unpack_int4(packed, 64), q)
    # byte 32 * g + j holds column 64 * g + j (low nibble) and 64 * g + 32 + j (high nibble)
    assert int(packed[2, 32 * 3 + 5]) == int(q[2, 64 * 3 + 5]) | (int(q[2, 64 * 3 + 32 + 5]) << 4)



def test_mma_layout_round_trips_and_feeds_the_mma_fragments():
    """quantize.shuffle_int4 (gemv.py's tensor-core layout) inverts, puts row g, column c of a tile where the
    docstring says, and, emulated lane by lane with mma.sync's m16n8k16 fragment layouts (PTX ISA) in float64,
    gives x @ W.T exactly (scripts/int4_mma_probe.py --emulate); with two nibbles of a word swapped, it does not."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import int4_mma_probe as P
    torch.manual_seed(0)
    q = torch.randint(0, 16, (32, 128), dtype=torch.int32)
    words = Q.shuffle_int4(q)
    assert words.shape == (32, 16) and words.dtype == torch.int32 and torch.equal(Q.unshuffle_int4(words), q)
    # tile (1, 1), lane 4g + t = 4 * 3 + 2, word j = 1: rows 16 + 3 and 16 + 11 at columns 64 + 16t + 4j = 100..103
    word = int(words.reshape(-1).view(torch.uint32)[(1 * 2 + 1) * 128 + (4 * 3 + 2) * 4 + 1])
    assert [(word >> 4 * p) & 15 for p in range(8)] == [int(q[16 + 3 + 8 * h, 100 + e]) for h, e in Q.MMA_NIBBLES]
    assert P.check_emulation() == 0.0
    nibbles = Q.MMA_NIBBLES
    try:
        Q.MMA_NIBBLES = (nibbles[0], nibbles[4], *nibbles[2:4], nibbles[1], *nibbles[5:])
        assert P.check_emulation() > 0.1
    finally:
        Q.MMA_NIBBLES = nibbles


_INTERPRETER_SCRIPT = textwrap.dedent("""
    import torch, gemv as G, quantize as Q
    torch.manual_seed(0)
    worst = {}
    def check(name, y, ref, dtype):
        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        worst[name, str(dtype)] = max(worst.get((name, str(dtype)), 0.0), err)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        # the rows kernels (M > 1) use tl.dot, which the interpreter gets wrong in bfloat16: float16 stands in
        skip = (lambda M: M > 1) if dtype == torch.bfloat16 else (lambda M: False)
        for N, K, M, bias in [(64, 256, 1, False), (33, 200, 3, True), (8, 4100, 1, True), (20, 96, 16, False)]:
            if skip(M):
                continue
            q8, s8 = Q.quantize_int8(torch.randn(N, K))
            b = torch.randn(N) if bias else None
            x = torch.randn(M, K).to(dtype)
            ref = x.double() @ (q8.double() * s8.double()[:, None]).T + (0 if b is None else b.double())
            check("int8", G.int8_gemv(x, q8, s8.to(dtype), None if b is None else b.to(dtype)), ref, dtype)
        for N, K_in, g, M, bias in [(64, 256, 128, 1, False), (40, 96, 32, 3, True), (24, 512, 256, 8, False), (16, 128, 32, 1, False),
                                     (16, 4160, 64, 1, True), (8, 200, 64, 2, False), (50, 200, 64, 16, True),
                                     (24, 256, 64, 6, True), (16, 192, 64, 7, False)]:
            if M > G.INT4_XQ_ROWS and dtype != torch.float16:  # these take the rows kernel, in bfloat16
                continue
            K = -(-K_in // g) * g  # 4160, 200: ragged chunks
            w = torch.nn.functional.pad(torch.randn(N, K_in), (0, K - K_in))
            s, z = Q.int4_qparams(w, g)
            q = Q.quantize_int4(w, s, z, g)
            b = torch.randn(N) if bias else None
            x = torch.randn(M, K_in).to(dtype)
            ref = x.double() @ Q.dequantize_int4(q, s, z, g)[:, :K_in].double().T + (0 if b is None else b.double())
            y = G.int4_gemv(x, Q.pack_int4(q, g), s.to(dtype), z.to(dtype), g, None if b is None else b.to(dtype))
            check("int4", y, ref, dtype)
    # one large activation (the one-row int4 GEMV rounds x onto int16 by its largest magnitude), and a NaN that must
    # reach its row's output and no other
    w = torch.randn(64, 512)
    s, z = Q.int4_qparams(w, 128)
    q = Q.quantize_int4(w, s, z, 128)
    for M, dtype in ((1, torch.bfloat16), (5, torch.float16)):
        x = torch.randn(M, 512).to(dtype)
        x[:, 7] = 60
        ref = x.double() @ Q.dequantize_int4(q, s.to(dtype).float(), z.to(dtype).float(), 128).double().T
        check("int4 large x", G.int4_gemv(x, Q.pack_int4(q, 128), s.to(dtype), z.to(dtype), 128), ref, dtype)
        x[-1, 3] = float("nan")
        y = G.int4_gemv(x, Q.pack_int4(q, 128), s.to(dtype), z.to(dtype), 128)
        assert not y[-1].isfinite().any() and y[:-1].isfinite().all()
    print(worst)
    assert all(e < (1e-5 if "float32" in d and n == "int8" else 2e-2) for (n, d), e in worst.items()), worst
""")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_gemvs_under_interpreter():
    """The GEMV kernels run on CPU tensors under TRITON_INTERPRET=1, which triton reads at import: so in a fresh
    process. Against the dequantized weights in float64: max-abs error over max-abs below 1e-5 with float32
    activations, 2e-2 with 16-bit ones (scales, bias and output rounded to 16 bits). Shapes cover ragged rows and
    chunks (masked paths), exact chunks, 1..16 input rows (the GEMVs and the rows kernels), bias, and group sizes."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT], capture_output=True, text=True, env=env, cwd=root,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-1000:] + run.stderr[-2000:]


def test_quantize_py_works_without_gemv_py():
    """Copied into a project without gemv.py, quantize.py falls back to torch's kernels: a tiny model quantizes to
    int8 and int4 and its logits stay within 20 dB SQNR of the float model's (in a fresh process where importing
    gemv fails)."""
    script = textwrap.dedent("""
        import sys
        sys.modules["gemv"] = None  # import gemv -> ImportError, as if the file were absent
        import torch, quantize as Q
        from model import ModelArgs, Transformer
        assert Q.triton is None
        args = ModelArgs(block_size=32, vocab_size=64, n_layer=2, n_head=2, dim=64, intermediate_size=96)
        x = torch.randint(0, 64, (1, 8))
        for mode in ("int8", "int4"):
            torch.manual_seed(0)
            model = Transformer(args).eval()
            with torch.no_grad():
                ref = model(x)
                Q.prepare_for_device(Q.quantize_model(model, mode, 32, verbose=False)[0])
                err = ((model(x) - ref).norm() / ref.norm()).item()
            assert err < 0.1, (mode, err)
            print(mode, err)
    """)
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=120)
    assert run.returncode == 0, run.stdout[-1000:] + run.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["torch", "triton", "mma"])
@pytest.mark.parametrize("g", [32, 64, 128, 256])
def test_cuda_int4_kernels_match_dequantized(g, kernel):
    """torch's tinygemm repacking, or the Triton GEMV (1 and 5 rows), the rows kernel (12) and dequantize-then-matmul
    (20 rows) on the stored layout, or the tensor cores on the shuffled one (1..8 rows a launch: 12 rows two; g = 32
    keeps the stored layout), against the dequantized weights; K = 576 (SmolLM2's width) takes tinygemm's 4-tile
    layout, and the mma kernel a tile a step."""
    torch.manual_seed(0)
    for N, K in ((256, 1024), (192, 576)):
        if K % g:
            continue
        lin = quantized_linear(torch.randn(N, K), "int4", g)
        ref_w = dequantized_weight(lin).cuda()
        lin = Q.prepare_for_device(lin.cuda().to(torch.bfloat16), int4_kernel=kernel)
        assert lin.use_triton == (kernel != "torch" and Q.triton is not None)
        if lin.use_triton:
            assert (lin.weight.dtype == torch.int32) == (kernel == "mma" and g % 64 == 0)
        for rows in (1, 5, 12, 20):
            x = torch.randn(rows, K, device="cuda", dtype=torch.bfloat16)
            assert rel_err(lin(x).float(), x.float() @ ref_w.T) < 2e-2


@pytest.mark.gpu
def test_cuda_int8_gemv_matches_dequantized():
    torch.manual_seed(0)
    lin = quantized_linear(torch.randn(512, 1024), "int8")
    ref_w = dequantized_weight(lin).cuda()
    lin = Q.prepare_for_device(lin.cuda().to(torch.bfloat16))
    assert lin.use_triton == (Q.triton is not None)
    for rows in (1, 5, 20):
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
        assert rel_err(lin(x).float(), x.float() @ ref_w.T) < 2e-2


@pytest.mark.gpu
def test_cuda_int4_wide_tiles_match_dequantized(monkeypatch):
    """The int4 GEMV's own tiles for W with gemv.WIDE_N rows or more (the 7B's wqkv), lowered here to 256, at 1 row
    and at 6 (the XQ GEMV)."""
    import gemv
    monkeypatch.setattr(gemv, "WIDE_N", 256)
    torch.manual_seed(0)
    lin = quantized_linear(torch.randn(256, 1024), "int4", 128)
    ref_w = dequantized_weight(lin).cuda()
    lin = Q.prepare_for_device(lin.cuda().to(torch.bfloat16), int4_kernel="triton")
    for rows in (1, 6):
        x = torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16)
        assert rel_err(lin(x).float(), x.float() @ ref_w.T) < 2e-2, rows


def test_unknown_kernel_name_is_refused():
    lin = quantized_linear(torch.randn(32, 64), "int4", 32)
    with pytest.raises(ValueError, match="int4_kernel must be 'torch' or 'triton'"):
        Q.prepare_for_device(lin, int4_kernel="tinygemm")


@pytest.mark.gpu
@pytest.mark.skipif(Q.triton is None, reason="needs triton")
def test_cuda_int4_mma_rows_are_each_rows_decode_bit_for_bit():
    """The tensor-core kernel computes each row of x the same way whatever the others (an mma's columns do not mix),
    so a verify over 2..8 rows gives every row's decode result bit for bit: a greedy bfloat16 verify keeps the
    target's own text. With the norm, the gate-up pair and the residual, as the model runs it."""
    import gemv as G
    torch.manual_seed(0)
    N, K, g = 256, 1024, 128
    mats = []
    for _ in range(2):
        q = torch.randint(0, 16, (N, K), dtype=torch.int32)
        s, z = torch.rand(N, K // g) / 8, torch.randn(N, K // g) / 8
        mats += [Q.shuffle_int4(q).cuda(), s.to("cuda", torch.bfloat16), z.to("cuda", torch.bfloat16)]
    x = torch.randn(8, K, device="cuda", dtype=torch.bfloat16)
    res = torch.randn(8, N, device="cuda", dtype=torch.bfloat16)
    nw = torch.rand(K, device="cuda", dtype=torch.bfloat16) + 0.5
    for kw in ({}, dict(residual=res), dict(gate=mats[3], gate_scales=mats[4], gate_zeros=mats[5], norm_weight=nw,
                                             rms_eps=1e-5)):
        y = G.int4_gemv(x, *mats[:3], g, **kw)
        for i in range(8):
            one = {k: (v[i:i + 1] if k == "residual" else v) for k, v in kw.items()}
            assert torch.equal(G.int4_gemv(x[i:i + 1], *mats[:3], g, **one), y[i:i + 1]), (i, list(kw))
