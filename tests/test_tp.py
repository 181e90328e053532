"""Tensor parallel over 2 CPU processes (gloo) computes what one process computes.

One spawn runs every case: each rank builds the same tiny random model, keeps a whole copy as the reference,
splits the other with tp.apply_tp, and compares logits and greedy tokens over a prefill and a few cached decode
steps (batch 2, so a hook that reduced only row 0 would show). The parent asserts per case.
"""
import copy
import faulthandler
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import model as M
import quantize
import tp

WORLD = 2
TINY = dict(block_size=64, vocab_size=96, n_layer=2, dim=32, n_head=4, n_local_heads=4, intermediate_size=64)
CASES = {
    "dense": dict(),
    "gqa": dict(n_local_heads=2),
    "qkv_bias": dict(n_local_heads=2, attention_bias=True),
    "moe": dict(n_local_heads=2, num_experts=4, num_activated_experts=2),
    "int8": dict(n_local_heads=2, attention_bias=True, quant=dict(mode="int8")),
    "int4": dict(n_local_heads=2, attention_bias=True, dim=64, intermediate_size=128, head_dim=16,
                 quant=dict(mode="int4", groupsize=32)),  # wo's 64 inputs: 32 a rank, one whole group each
    "moe_int4": dict(n_local_heads=2, num_experts=4, num_activated_experts=2, dim=64, intermediate_size=64,
                     head_dim=16, quant=dict(mode="int4", groupsize=32)),  # int4 attention, int8 experts
}
PROMPT, STEPS = 10, 4  # batch 2 x 10 tokens = 20 > 16 also takes the MoE prefill path, decode the sparse one
TIMEOUT_S = 240


def tiny_model(seed, quant=None, **overrides):
    torch.manual_seed(seed)
    model = M.Transformer(M.ModelArgs(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:  # q/k/v bias
                p.normal_(0, 0.5)
            else:
                p.normal_(0, p.shape[-1] ** -0.5 if "tok_embeddings" not in name else 1.0)
    if quant:
        quantize.quantize_model(model, **quant, verbose=False)
    return model.eval()


@torch.no_grad()
def greedy(model, prompt, steps):
    """Logits of the prefill and of each cached greedy decode step, and the tokens picked."""
    quantize.prepare_for_device(model)  # int4: repack for the CPU kernel, after any slicing
    model.setup_caches(prompt.shape[0], prompt.shape[1] + steps)
    logits = [model(prompt, torch.arange(prompt.shape[1]))]
    tokens = []
    for i in range(steps):
        tokens.append(logits[-1][:, -1:].argmax(-1))  # (B, 1)
        logits.append(model(tokens[-1], torch.tensor([prompt.shape[1] + i])))
    return logits, torch.cat(tokens, 1)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def run_case(spec):
    spec = dict(spec)
    quant = spec.pop("quant", None)
    ref = tiny_model(0, quant, **spec)
    split = copy.deepcopy(ref)
    w1_before = getattr(split.layers[0].feed_forward.w1, "weight", None)
    tp.apply_tp(split)
    w1_after = getattr(split.layers[0].feed_forward.w1, "weight", None)
    prompt = torch.randint(0, TINY["vocab_size"], (2, PROMPT), generator=torch.Generator().manual_seed(1))
    (ref_logits, ref_tokens), (tp_logits, tp_tokens) = greedy(ref, prompt, STEPS), greedy(split, prompt, STEPS)
    view = (isinstance(w1_before, torch.Tensor) and w1_before.dim() == 2
            and w1_after.untyped_storage().data_ptr() == w1_before.untyped_storage().data_ptr())
    return {"err": max(rel_err(t, r) for t, r in zip(tp_logits, ref_logits)),
            "same_tokens": torch.equal(ref_tokens, tp_tokens), "w1_is_view": view,
            "config_whole": split.config == ref.config,  # mtp.load checks a head against the whole model's config
            "kv_heads": split.layers[0].attention.kv_cache.k_cache.shape[1],
            "kv_heads_ref": ref.layers[0].attention.kv_cache.k_cache.shape[1]}


def run_compiled(folder):
    """generate.py's CPU path: load_model(use_tp=True), then the decode step compiled as compile_step compiles it on
    the CPU (fullgraph, inductor with freezing and max-autotune). The all-reduces must sit inside the one graph, and
    rank 1's row shards, views at an offset after apply_tp, must compute right (tp.own_storage: they did not)."""
    import generate
    ref = tiny_model(0, n_local_heads=2)
    folder.mkdir(parents=True)
    ref.config.to_json(folder / "config.json")
    torch.save(ref.state_dict(), folder / "model.pth")
    split = generate.load_model(folder / "model.pth", "cpu", torch.float32, use_tp=True)
    prompt = torch.randint(0, TINY["vocab_size"], (2, PROMPT), generator=torch.Generator().manual_seed(1))
    step = generate.compile_step(lambda m, x, pos: m(x, pos), "cpu")
    with torch.no_grad():
        for m in (ref, split):
            m.setup_caches(2, PROMPT + STEPS)
        tok = ref(prompt, torch.arange(PROMPT))[:, -1:].argmax(-1)
        split(prompt, torch.arange(PROMPT))
        errs = []
        for i in range(STEPS):
            pos = torch.tensor([PROMPT + i])
            a, b = step(split, tok, pos), ref(tok, pos)
            errs.append(rel_err(a, b))
            tok = b[:, -1:].argmax(-1)
    return {"err": max(errs)}


def worker(rank, port, out_dir):
    faulthandler.enable()  # a crash in C++ (gloo, inductor) prints every thread's Python stack with the stage below
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results = {"rank": tp.maybe_init_dist()}
    for name, spec in CASES.items():
        print(f"rank {rank}: case {name}", file=sys.stderr, flush=True)
        results[name] = run_case(spec)
    try:  # raised by both ranks before any collective, so no rank is left waiting
        tp.apply_tp(tiny_model(0, n_head=6, n_local_heads=3, head_dim=8, intermediate_size=96))
        results["bad_world"] = None
    except ValueError as e:
        results["bad_world"] = str(e)
    print(f"rank {rank}: compiled decode", file=sys.stderr, flush=True)
    results["compiled"] = run_compiled(out_dir / f"ckpt{rank}")  # last: compile_step sets inductor's freezing
    print(f"rank {rank}: leave_dist", file=sys.stderr, flush=True)
    tp.leave_dist()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))
    print(f"rank {rank}: done", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    ctx = mp.start_processes(worker, args=(free_port(), out), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.time() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):
            if time.time() > deadline:
                pytest.fail(f"the {WORLD} tensor-parallel processes did not finish within {TIMEOUT_S} s")
    except mp.ProcessRaisedException as e:
        pytest.fail(f"a tensor-parallel process failed:\n{e}")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_tp2_matches_tp1(results, case):
    # torch's CPU int8 and int4 kernels compute in bfloat16 (quantize.py), so split partial sums round differently
    bound = 1e-2 if CASES[case].get("quant", {}).get("mode") in ("int8", "int4") else 1e-5
    for r in results:
        res = r[case]
        assert res["err"] < bound, f"rank {r['rank']}: logits differ by {res['err']:.2e} relative"
        assert res["same_tokens"], f"rank {r['rank']}: greedy tokens differ"
        assert res["kv_heads"] * WORLD == res["kv_heads_ref"], "the KV cache is not split by heads"
        assert res["config_whole"], "apply_tp changed model.config, which must keep describing the whole model"
        if "moe" not in case:
            assert res["w1_is_view"], "a column shard was copied instead of viewed: ranks would read the whole weight"


def test_tp2_compiled_decode(results):
    for r in results:
        assert r["compiled"]["err"] < 1e-5


def test_bad_world_size_refused_under_dist(results):
    for r in results:
        assert r["bad_world"] is not None and "3 KV heads" in r["bad_world"] and "1 or 3" in r["bad_world"]


def test_ranks_report_their_rank(results):
    assert [r["rank"] for r in results] == list(range(WORLD))


def test_check_tp_names_numbers_and_valid_sizes():
    qwen = M.ModelArgs.from_name("Qwen2.5-0.5B")  # 14 heads, 2 KV heads
    with pytest.raises(ValueError, match=r"4 processes .*14 heads, 2 KV heads.*--nproc_per_node 1 or 2$"):
        tp.check_tp(qwen, 4)
    tp.check_tp(qwen, 2)
    assert tp.valid_world_sizes(M.ModelArgs.from_name("Llama-3-70B")) == [1, 2, 4, 8]
    assert tp.valid_world_sizes(M.ModelArgs.from_name("SmolLM2-135M")) == [1, 3]


def test_check_tp_int4_groups_must_not_straddle_ranks():
    # 8 heads x 16 = 128 inputs to wo: 2 ranks get 64 each, 4 ranks 32 each, which is not a whole group of 64
    config = M.ModelArgs(dim=128, n_head=8, n_local_heads=8, head_dim=16, intermediate_size=256)
    assert tp.valid_world_sizes(config, groupsize=64) == [1, 2]
    with pytest.raises(ValueError, match="int4 groups of 64"):
        tp.check_tp(config, 4, groupsize=64)


def test_maybe_init_dist_alone_is_none(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert tp.maybe_init_dist() is None


def test_torchrun_generate_smollm2_greedy_text_equals_one_process(smollm2_checkpoint):
    """The user's command end to end: `torchrun --nproc_per_node 3 generate.py` (SmolLM2's 3 KV heads allow 1 or
    3) prints the text one process prints, and every rank exits 0 (tp.leave_dist: an exit could abort in gloo)."""
    args = ["generate.py", "--checkpoint_path", str(smollm2_checkpoint / "model.pth"), "--device", "cpu",
            "--temperature", "0", "--max_new_tokens", "24", "--prompt", "The capital of France is"]
    runs = [subprocess.run([sys.executable, *launcher, *args], capture_output=True, text=True, timeout=300,
                           cwd=Path(__file__).resolve().parents[1])
            for launcher in ([], ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3"])]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert runs[1].stdout == runs[0].stdout and "Paris" in runs[0].stdout
