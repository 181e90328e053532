"""decode_attention.py's kernel against model.py's RoPE, cache update and PyTorch's SDPA: on the CPU through
Triton's interpreter, on CUDA in bf16 and float32, and inside a compiled model (CUDA only)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = [  # B, H, H_kv, S, D, S_max, first position, left padding per row (or a draft tree)
    (1, 4, 4, 1, 32, 100, 37, None),  # decode, one query head per KV head
    (1, 6, 2, 4, 64, 90, 80, None),  # verification of 4 positions, 3 query heads per KV head
    (2, 8, 2, 6, 16, 40, 20, [0, 7]),  # a left-padded batch, 24 rows per program
    (1, 2, 1, 3, 32, 600, 300, None),  # a cache of 3 chunks, the last one past every query: merged
    (1, 4, 2, 4, 16, 300, 254, None),  # new positions in two chunks: each chunk's program writes its own
    (2, 4, 2, 1, 16, 700, 5, [3, 0]),  # 3 chunks, only the first one used
    (1, 6, 2, 11, 32, 300, 250, "tree"),  # a draft tree (2, 2, 1): its 4-D mask and RoPE rows apart from the slots
]


def check(device, dtype, bound):
    """Largest relative error of the output, and of the cache after the kernel wrote the new keys and values,
    against model.py's `Attention.attend` in float64 (RoPE, KVCache.update, SDPA with the model's own masks) over
    CASES."""
    from decode_attention import CHUNK, decode_attention, decode_attention_pdl
    from model import Attention, KVCache, ModelArgs, rope_tables
    assert any(c[5] > CHUNK for c in CASES) and any(c[5] <= CHUNK for c in CASES)  # both paths run
    torch.manual_seed(0)
    worst = 0.0
    for B, H, n_kv, S, D, S_max, pos0, left_pad in CASES:
        qkv = torch.randn(B, S, (H + 2 * n_kv) * D, device=device).to(dtype)
        caches = [torch.randn(B + 1, n_kv, S_max, D, device=device).to(dtype) for _ in range(2)]  # one spare row
        input_pos = torch.arange(pos0, pos0 + S, device=device)
        slots = torch.arange(S_max, device=device)
        mask = slots[None, :] <= input_pos[:, None]  # (S, S_max), as model.py builds it
        cos, sin = rope_tables(S_max, D, 10000.0, device=device)
        pos = input_pos[None, :]
        if left_pad == "tree":
            from model import tree_inputs
            from spec_tree import DraftTree
            mask, pos = tree_inputs(slots, input_pos[:1], *DraftTree((2, 2, 1)).tensors(device))
        elif left_pad is not None:
            pad = torch.tensor(left_pad, device=device)
            mask = ((mask & (slots >= pad[:, None, None])) | (slots == input_pos[:, None]))[:, None]
            pos = (input_pos[None, :] - pad[:, None]).clamp(min=0)
        rope = (cos, sin, pos)
        with torch.device("meta"):  # model.py's own attention path, in float64 (its weights are not used)
            attn = Attention(ModelArgs(n_head=H, n_local_heads=n_kv, head_dim=D))
        attn.kv_cache = KVCache(B + 1, S_max, n_kv, D, torch.float64).to(device)
        attn.kv_cache.k_cache.copy_(caches[0]), attn.kv_cache.v_cache.copy_(caches[1])
        ref = attn.attend(qkv.double(), (cos.double(), sin.double(), pos), mask, input_pos)
        k_ref, v_ref = attn.kv_cache.k_cache, attn.kv_cache.v_cache
        before = [c.clone() for c in caches]
        y = decode_attention(qkv, rope, caches[0], caches[1], mask, input_pos, H)
        y_pdl = decode_attention_pdl(qkv, rope, *before, mask, input_pos, H)  # the custom op: the same launch
        assert torch.equal(y_pdl, y) and all(torch.equal(a, b) for a, b in zip(before, caches))
        err = ((y.double() - ref).norm() / ref.norm()).item()
        err_k = ((caches[0].double() - k_ref).norm() / k_ref.norm()).item()
        assert torch.equal(caches[1].double(), v_ref), (B, H, n_kv, S, D, S_max, pos0, left_pad, dtype)
        assert y.shape == ref.shape and max(err, err_k) < bound, (B, H, n_kv, S, D, S_max, pos0, left_pad, dtype,
                                                                  err, err_k)
        worst = max(worst, err, err_k)
    return worst


def test_decode_attention_matches_sdpa_under_the_interpreter():
    code = (f"import sys, torch; sys.path.insert(0, {str(ROOT / 'tests')!r}); from test_decode_attention import check; "
            "print('ok', check('cpu', torch.float32, 1e-5), check('cpu', torch.float16, 3e-3))")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stdout + r.stderr[-3000:]


COMPILED_IN_PLACE = r"""
import torch
from torch._inductor.utils import run_and_get_code
import decode_attention as A
from model import rope_tables
torch.manual_seed(0)
H, n_kv, D, S_max = 4, 2, 32, 64
qkv, pos = torch.randn(1, 1, (H + 2 * n_kv) * D), torch.tensor([10])
caches = [torch.randn(1, n_kv, S_max, D) for _ in range(4)]  # two layers' keys and values
cos, sin = rope_tables(S_max, D, 10000.0)
expected = [c.clone() for c in caches]
mask = torch.arange(S_max)[None, :] <= pos[:, None]
ref = [A.decode_attention(qkv, (cos, sin, pos[None]), *expected[i:i + 2], mask, pos, H) for i in (0, 2)]
def step(qkv, k0, v0, k1, v1, pos):
    mask = torch.arange(S_max)[None, :] <= pos[:, None]  # model.py's causal mask: never built in the graph
    rope = (cos, sin, pos[None])  # as model.py passes it: the tables and the rows, gathered by the kernel
    return [A.decode_attention_pdl(qkv, rope, k, v, mask, pos, H) * 2 for k, v in ((k0, v0), (k1, v1))]
ptrs = [c.data_ptr() for c in caches]
out, code = run_and_get_code(torch.compile(step, fullgraph=True), qkv, *caches, pos)
assert all(torch.equal(o, 2 * r) for o, r in zip(out, ref)) and all(torch.equal(a, b) for a, b in zip(caches, expected))
assert [c.data_ptr() for c in caches] == ptrs
lines = "\n".join(code).splitlines()
calls = [l for l in lines if "torch.ops.mtp_fast.decode_attention" in l and "=" in l]
assert len(calls) == 2 and all(", None, " in c for c in calls), calls  # no mask tensor
assert not [l for l in lines if "clone(" in l or ".copy_(" in l]  # the caches, in place
assert not [l for l in lines if "index" in l and "cpp_fused" in l]  # no per-layer copy of the RoPE rows
print("ok")
"""


def test_attention_op_writes_the_caches_in_place_when_compiled():
    """decode_attention's custom op declares the caches as written: compiled, it must write them in place (no clone
    of a cache and no copy back, which would cost a cache's bytes a layer), get no mask tensor, and take model.py's
    RoPE tables as they are, with no gathered copy of their rows for each layer (compiled as a traced Triton kernel
    taking gathered rows, 16 such copies ran in a Llama-2-7B decode step)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    r = subprocess.run([sys.executable, "-c", COMPILED_IN_PLACE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr[-3000:]


def test_kernel_compiles_for_hopper_with_pdl():
    """The attention kernel compiles for sm_90 here, through Triton's compiler and ptxas, no GPU needed, launched
    plainly and with PDL, whose cache prefetch is inline PTX that the interpreter never runs, over one chunk and
    split (with the merge kernel); and for sm_80 (A100), plainly."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter compiles nothing")
    sys.path.insert(0, str(ROOT / "scripts"))
    import decode_attention as A
    from kernel_resources import ATTENTION_POINTERS, attention_consts, compile_sm
    for pdl, sm, split in ((False, 90, False), (True, 90, False), (True, 90, True), (False, 80, False)):
        assert compile_sm(A._attention_kernel, ATTENTION_POINTERS, attention_consts(PDL=pdl, SPLIT=split),
                          A.NUM_WARPS, A.NUM_STAGES, capability=sm)["programs_per_sm"]
    assert compile_sm(A._merge_kernel, ATTENTION_POINTERS, attention_consts(), 4)["programs_per_sm"]


@pytest.mark.gpu
def test_cuda_decode_attention_matches_sdpa():
    check("cuda", torch.float32, 1e-5)
    check("cuda", torch.bfloat16, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True], ids=["plain launch", "PDL custom op"])
def test_cuda_model_with_the_kernel_equals_sdpa_compiled(pdl):
    """A tiny float32 model: decode and verify logits with the kernel (RoPE and cache writes included) equal SDPA's,
    eager and as a compiled CUDA graph, and greedy generation gives the same tokens (with no CUDA graph skipped)."""
    from torch._dynamo.utils import counters

    from decode_attention import use_decode_attention
    from generate import compile_step, decode_one_token, generate
    from model import ModelArgs, Transformer
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(ModelArgs(n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=128,
                                      vocab_size=97, block_size=512)).eval()
    prompt = torch.randint(0, 97, (1, 20), device="cuda")

    def logits(m, x, pos):
        return m(x, pos)
    outs = {}
    for name in ("sdpa", "kernel", "kernel-compiled"):
        if name != "sdpa":
            use_decode_attention(model, pdl=pdl)
        fn = torch.compile(logits, fullgraph=True) if name.endswith("compiled") else logits
        model.setup_caches(1, 300)  # 2 chunks: the merge kernel runs too
        with torch.no_grad():
            model(prompt, torch.arange(20, device="cuda"))
            one = fn(model, prompt[:, :1], torch.tensor([20], device="cuda"))
            five = fn(model, prompt[:, :5], torch.arange(21, 26, device="cuda"))
        outs[name] = torch.cat([one, five], 1)
    for name in ("kernel", "kernel-compiled"):
        assert torch.allclose(outs[name], outs["sdpa"], atol=1e-4, rtol=1e-4), name
    decode = compile_step(decode_one_token, "cuda")
    skips = counters["inductor"]["cudagraph_skips"]
    a = generate(model, [prompt[0].tolist()], 30, decode_fn=decode, max_seq_length=300)
    assert counters["inductor"]["cudagraph_skips"] == skips, "the compiled step ran without its CUDA graph"
    for layer in model.layers:
        layer.attention.decode_attention = None
    b = generate(model, [prompt[0].tolist()], 30, max_seq_length=300)
    assert a == b
