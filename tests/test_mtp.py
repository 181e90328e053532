"""The MTP head on tiny random models: drafting equals training, cache rollback, vocabulary slice, checkpoints,
training, native weight layouts, the distillation prompt set; plus the real SmolLM2 with the shipped head."""
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import generate as gen
import mtp
import mtp_train
from generate import Sampling, generate, load_model, speculative_generate
from conftest import tiny
from test_speculative import chi2, chi2_pvalue, next_probs

SHIPPED_HEAD = Path(__file__).resolve().parents[1] / "checkpoints/SmolLM2-135M-Instruct" / mtp.MTP_HEAD_FILE
DEV_PROMPTS = Path(__file__).resolve().parents[2] / "shared/prompts/dev.jsonl"

GREEDY, WARM = Sampling(0.0), Sampling(1.0)


def tiny_head(model, seed=1, vocab_ids=None):
    torch.manual_seed(seed)
    head = mtp.MTPHead(model.config)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return head.eval().share(model, vocab_ids)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run faster on one thread, and a busy machine cannot slow them down by oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def sharp_and_trained():
    """A confident tiny target and a head trained on its own text for a few steps, drafting over 60 of its 101
    tokens: it drafts right some of the time, so runs mix full, partial and zero acceptance."""
    model = sharp_tiny()
    data = tiny_corpus(model)
    vocab = mtp_train.token_ranking(data, 101)[:60]
    head = mtp.new_head(model)
    torch.manual_seed(0)
    mtp_train.train_head(model, head, data, k=3, steps=40, batch_size=8, lr=3e-3, vocab_ids=vocab, eval_every=1000,
                   log=lambda *_: None)
    return model, head.share(model, vocab)


def sharp_tiny(seed=0):
    model = tiny(seed)
    with torch.no_grad():
        model.output.weight.mul_(4)  # a confident target, so its text has something to learn beyond noise
    return model


# ------------------------------------------------------------------------------------------ lossless speculation
@pytest.mark.parametrize("k", [1, 3])
@torch.no_grad()
def test_greedy_output_equals_the_target_alone(k, sharp_and_trained):
    model, trained = sharp_and_trained
    accepted = []
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, 101, (1 + seed % 4 * 3,), generator=g).tolist()  # lengths 1, 4, 7, 10
        want = generate(model, [prompt], 40)
        for head in (tiny_head(model, seed), trained):
            got = speculative_generate(model, mtp.MTPDrafter(head, model), [prompt], 40, GREEDY, k, accepted=accepted)
            assert got == want
    assert 0 in accepted and k in accepted  # rejections and full acceptances both happened


@torch.no_grad()
def mtp_loop_pvalue(n_runs, tree=None):
    """The whole loop with an MTP drafter over a 12-token list (q is zero on the other 4), drafting a chain of 2 or
    `tree` (of depth 2): the third new token of many sampled runs against its exact marginal, summed over the first
    two tokens."""
    V, s, ctx = 16, Sampling(0.9, top_k=12), [3, 1, 4]
    target = tiny(1, vocab_size=V, n_layer=1)
    p0 = next_probs(target, [ctx], s)[0]
    p1 = next_probs(target, [[*ctx, a] for a in range(V)], s)
    p2 = next_probs(target, [[*ctx, a, b] for a in range(V) for b in range(V)], s).view(V, V, V)
    exact = torch.einsum("a,ab,abc->c", p0, p1, p2)
    drafter = mtp.MTPDrafter(tiny_head(target, vocab_ids=torch.arange(12)), target, tree=tree)
    torch.manual_seed(0)
    third = [speculative_generate(target, drafter, [ctx], 3, s, 2)[0][2] for _ in range(n_runs)]
    return chi2_pvalue(*chi2(torch.bincount(torch.tensor(third), minlength=V), n_runs * exact))


def test_sampling_with_the_head_follows_the_target_distribution():
    assert mtp_loop_pvalue(2000) > 1e-3


def test_negative_control_accepting_every_draft_is_detected(monkeypatch):
    monkeypatch.setattr(gen, "acceptance_probs", lambda p, q: torch.ones_like(p))
    assert mtp_loop_pvalue(600) < 1e-6


@torch.no_grad()
def test_the_proposal_traces_as_one_graph():
    """fullgraph capture of the whole proposal (what --compile turns into one CUDA graph) computes the same thing;
    the eager backend checks the capture without paying for code generation on a CPU test."""
    torch._dynamo.reset()
    model = tiny()
    head = tiny_head(model, vocab_ids=torch.arange(60))
    step = torch.compile(gen.spec_step, backend="eager", fullgraph=True, dynamic=False)
    for s in (GREEDY, WARM):
        torch.manual_seed(0)
        want = speculative_generate(model, mtp.MTPDrafter(head, model), [[1, 2, 3]], 30, s, 3)
        torch.manual_seed(0)
        assert speculative_generate(model, mtp.MTPDrafter(head, model), [[1, 2, 3]], 30, s, 3, step_fn=step) == want


@torch.no_grad()
def test_the_compiled_proposal_compiles_once(sharp_and_trained):
    """Full, partial and zero acceptances all reuse one graph of the whole step, proposal and verify (a stride
    that depended on them used to recompile)."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    counter = CompileCounter()
    model, head = sharp_and_trained
    step = torch.compile(gen.spec_step, backend=counter, fullgraph=True, dynamic=False)
    accepted = []
    for seed in range(6):
        prompt = torch.randint(0, 101, (1 + seed % 4 * 3,), generator=torch.Generator().manual_seed(seed)).tolist()
        speculative_generate(model, mtp.MTPDrafter(head, model), [prompt], 40, GREEDY, 3, accepted=accepted,
                             max_seq_length=64, step_fn=step)
    assert 0 in accepted and 3 in accepted, f"runs should mix zero and full acceptance, got {set(accepted)}"
    assert counter.frame_count == 1, f"the speculative step compiled {counter.frame_count} times, expected once"


@torch.no_grad()
def test_generate_flags_load_the_head(tmp_path):
    model = tiny()
    mtp.save_head(tmp_path / mtp.MTP_HEAD_FILE, tiny_head(model), base="tiny", k=2, vocab_rank=torch.randperm(101),
                  draft_vocab=50)
    spec = gen.load_speculation(gen.parse_args(["--mtp"]), model, None, tmp_path, "cpu", torch.float32)
    assert spec.k == 2 and len(spec.drafter.head.vocab_ids) == 50  # the trained k and vocabulary by default
    args = gen.parse_args(["--mtp_checkpoint_path", str(tmp_path / mtp.MTP_HEAD_FILE), "--speculate_k", "4",
                           "--draft_vocab", "0"])
    spec = gen.load_speculation(args, model, None, tmp_path / "elsewhere", "cpu", torch.float32)
    assert spec.k == 4 and spec.drafter.head.vocab_ids is None
    got = speculative_generate(model, spec.drafter, [[1, 2]], 20, GREEDY, spec.k, prefill_fn=spec.prefill_fn,
                               step_fn=spec.step_fn)
    assert got == generate(model, [[1, 2]], 20)
    with pytest.raises(ValueError, match="choose one"):
        gen.load_speculation(gen.parse_args(["--mtp", "--draft_checkpoint_path", "x.pth"]), model, None, tmp_path,
                             "cpu", torch.float32)
    with pytest.raises(FileNotFoundError, match="mtp.py train"):
        gen.load_speculation(gen.parse_args(["--mtp"]), model, None, tmp_path / "elsewhere", "cpu", torch.float32)


# ------------------------------------------------------------------------------------------ drafting internals
def state_after(x, h, p, n, k):
    """The speculative state a verify at slots p..p+k leaves on the text x (states h) when it accepted n drafts
    and chose x[p+n+1] next; its rejected slots hold junk tokens and states, which the drafter must not use."""
    g = torch.Generator().manual_seed(p)  # not the global generator: sampled drafting draws from that one
    xs, hs = x[:, p:p + k + 1].clone(), h[:, p:p + k + 1].clone()
    xs[0, n + 1:] = torch.randint(0, 101, (k - n,), generator=g)
    hs[:, n + 1:] = torch.randn(hs[:, n + 1:].shape, generator=g)
    return xs, torch.tensor(n), x[0, p + n + 1], hs, torch.arange(p, p + k + 1)


@torch.no_grad()
def test_drafting_computes_what_training_computes():
    """Incremental drafting with the head's KV cache, caught up by rounds of 1..k+1 accepted positions, gives the
    teacher-forced training logits at every anchor and step: the cache holds exactly the accepted prefix."""
    model = tiny()
    head = tiny_head(model)
    K, T = 3, 40
    x = torch.randint(0, 101, (1, T))
    h = model(x, return_hidden=True)[1]
    want = mtp_train.teacher_forced_logits(head, model, h, x, K, head.draft_weight)  # K x (1, T-K-1, V)
    head.setup_caches(1, 64)
    rng, done, checked = random.Random(0), 0, 0
    while done < T - K - 1:
        a0, a1 = done, min(done + rng.randint(1, K + 1), T - K - 1) - 1  # new anchors a0..a1
        y = head(h[:, a0:a1 + 1], model.tok_embeddings(x[:, a0 + 1:a1 + 2]), torch.arange(a0, a1 + 1))[:, -1:]
        for i in range(K):
            torch.testing.assert_close(head.logits(y)[:, -1], want[i][:, a1], atol=1e-4, rtol=1e-4)
            if i + 1 < K:  # step i+2 at position a1+i+1 on the token after the one step i+1 predicted
                y = head(y, model.tok_embeddings(x[:, a1 + i + 2:a1 + i + 3]), torch.tensor([a1 + i + 1]))
        done, checked = a1 + 1, checked + 1
    assert checked > 5


@pytest.mark.parametrize("s", [GREEDY, WARM])
@torch.no_grad()
def test_proposals_after_partial_acceptance_equal_a_fresh_replay(s):
    """After any sequence of acceptances (0..k of k drafts, then one token of the target's), the drafter proposes
    exactly what a fresh drafter given only the accepted prefix proposes."""
    model, k, T = tiny(), 3, 5
    head = tiny_head(model)
    x = torch.randint(0, 101, (1, 80))
    h = model(x, return_hidden=True)[1]  # the target's states along the "accepted" text x
    drafter = mtp.MTPDrafter(head, model)
    drafter.setup(96)
    drafter.prefill(x[:, :T], h[:, :T])
    p, n, rng, ns = T - 1, 0, random.Random(0), set()
    while p < 70:
        torch.manual_seed(p)
        got = drafter.propose(*state_after(x, h, p, n, k), k, s)
        pos = p + n + 1  # the slot of the target's own token, which the drafts follow
        fresh = mtp.MTPDrafter(tiny_head(model), model)
        fresh.setup(96)
        fresh.prefill(x[:, :pos], h[:, :pos])
        torch.manual_seed(p)
        ref = fresh.propose(*state_after(x, h, pos - 1, 0, k), k, s)
        assert torch.equal(got[0], ref[0])
        torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-4)
        assert got[0].shape == (k,) and got[1].shape == (k, 101)
        ns.add(n)
        p, n = pos, rng.randint(0, k)  # the next verify starts at that token and accepts n drafts
    assert ns == set(range(k + 1))


@torch.no_grad()
def test_vocabulary_slice_drafts_like_the_full_head():
    """With every drafted token in the list, the sliced head drafts the same tokens, and its distribution is the
    full head's renormalized over the list (zero elsewhere)."""
    model, k = tiny(), 3
    x = torch.randint(0, 101, (1, 30))
    h = model(x, return_hidden=True)[1]
    full = mtp.MTPDrafter(tiny_head(model), model)
    full.setup(64)
    full.prefill(x[:, :10], h[:, :10])
    drafts = [full.propose(*state_after(x, h, p - 1, 0, k), k, GREEDY)[0] for p in range(10, 20)]
    used = torch.cat(drafts).unique()
    vocab = torch.cat([used, torch.tensor([t for t in torch.randperm(101).tolist() if t not in used.tolist()][:20])])
    assert len(vocab) < 101
    sliced = mtp.MTPDrafter(tiny_head(model, vocab_ids=vocab), model)
    sliced.setup(64)
    sliced.prefill(x[:, :10], h[:, :10])
    for p, d in zip(range(10, 20), drafts):
        got, q = sliced.propose(*state_after(x, h, p - 1, 0, k), k, GREEDY)
        assert torch.equal(got, d) and torch.equal(q.argmax(-1), d)
    head_full, head_sliced = tiny_head(model), tiny_head(model, vocab_ids=vocab)
    y = torch.randn(4, 32)
    torch.manual_seed(0)
    q_full = head_full.sample(y, WARM)[1]
    q_sliced = head_sliced.sample(y, WARM)[1]
    renorm = torch.zeros_like(q_full)
    renorm[:, vocab] = q_full[:, vocab] / q_full[:, vocab].sum(-1, keepdim=True)
    torch.testing.assert_close(q_sliced, renorm)


@torch.no_grad()
def test_head_checkpoint_round_trip(tmp_path):
    model = tiny()
    head = tiny_head(model)
    rank = torch.randperm(101)
    mtp.save_head(tmp_path / "mtp_head.pth", head, base="tiny", k=3, vocab_rank=rank, draft_vocab=40)
    loaded = mtp.load_head(tmp_path / "mtp_head.pth", model)
    assert loaded.k == 3 and torch.equal(loaded.vocab_ids, rank[:40])
    for (n, a), (m, b) in zip(head.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a.bfloat16().float(), b)  # stored in bfloat16
    assert mtp.load_head(tmp_path / "mtp_head.pth", model, draft_vocab=0).vocab_ids is None
    assert torch.equal(mtp.load_head(tmp_path / "mtp_head.pth", model, draft_vocab=7).vocab_ids, rank[:7])
    with pytest.raises(ValueError, match="out of range"):
        mtp.load_head(tmp_path / "mtp_head.pth", model, draft_vocab=500)
    with pytest.raises(ValueError, match="made for tiny"):
        mtp.load_head(tmp_path / "mtp_head.pth", tiny(dim=64))
    with pytest.raises(FileNotFoundError, match="mtp.py train"):
        mtp.load_head(tmp_path / "nope.pth", model)
    torch.save(model.state_dict(), tmp_path / "model.pth")  # a model checkpoint passed as the head
    torch.save({"config": torch.load(tmp_path / "mtp_head.pth", weights_only=True)["config"]}, tmp_path / "bare.pth")
    for wrong in ("model.pth", "bare.pth"):
        with pytest.raises(ValueError, match="is not an MTP head checkpoint"):
            mtp.read_head(tmp_path / wrong, model)


def tiny_prompts(n, prompt_len=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 101, (prompt_len + i % 3,), generator=g).tolist() for i in range(n)]


def tiny_corpus(model, n=24, new=24, seed=0):
    torch.manual_seed(seed)
    return mtp_train.distill(model, tiny_prompts(n, seed=seed), new, batch_size=8, s=Sampling(0.7), log=lambda *_: None)


def test_distilled_corpus_layout():
    model = tiny()
    prompts = tiny_prompts(10)
    torch.manual_seed(0)
    data = mtp_train.distill(model, prompts, 12, batch_size=4, s=GREEDY, stop_ids={7}, log=lambda *_: None)
    offsets, plens, ids = data["offsets"], data["prompt_lens"], data["ids"].tolist()
    assert len(offsets) == 11 and offsets[-1] == len(ids) and data["ids"].dtype == torch.int32
    for i, p in enumerate(prompts):
        row = ids[offsets[i]:offsets[i + 1]]
        assert plens[i] == len(p) and row[:len(p)] == p
        assert row[len(p):] == generate(model, [p], 12, stop_ids={7})[0]
    cut = mtp_train.distill(model, prompts, 12, batch_size=4, s=GREEDY, stop_ids={7}, log=lambda *_: None,
                            time_limit=0)  # past its limit at once: the first batch alone
    assert len(cut["prompt_lens"]) == 4 and torch.equal(cut["ids"], data["ids"][:int(cut["offsets"][-1])])
    rank = mtp_train.token_ranking(data, 101)
    assert sorted(rank.tolist()) == list(range(101))
    cov = mtp_train.coverage(data, rank, [1, 10, 101])
    assert cov[1] <= cov[10] <= cov[101] == 1.0


@pytest.mark.parametrize("targets,vocab", [("soft", None), ("hard", 60)])
def test_training_reduces_the_loss(targets, vocab):
    model = sharp_tiny()
    data = tiny_corpus(model)
    vocab_ids = mtp_train.token_ranking(data, 101)[:vocab] if vocab else None
    head = mtp.new_head(model)
    torch.manual_seed(0)
    losses, evals = mtp_train.train_head(model, head, data, k=3, steps=30, batch_size=8, lr=3e-3, vocab_ids=vocab_ids,
                                   targets=targets, eval_every=1000, log=lambda *_: None)
    assert len(losses) == 30 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert all(p.grad is None for p in model.parameters())  # the target stays frozen
    step, acc, tau = evals[-1]  # the held-out evaluation at the last step
    assert step == 30 and len(acc) == 3 and all(0 <= a <= 1 for a in acc) and 1 <= tau <= 4


def test_training_resumes_where_it_stopped(monkeypatch):
    """Stopped by its time limit after 3 of 6 steps and resumed from the returned state, training ends with the
    weights of an uninterrupted run, exactly."""
    model = sharp_tiny()
    data = tiny_corpus(model)
    kw = dict(k=3, steps=6, batch_size=8, lr=3e-3, eval_every=1000)
    torch.manual_seed(0)
    straight = mtp.new_head(model)
    mtp_train.train_head(model, straight, data, log=lambda *_: None, **kw)

    clock = [0.0]  # a fake clock: one second per logged training step, a microsecond per reading

    def now():
        clock[0] += 1e-6
        return clock[0]

    monkeypatch.setattr(mtp_train.time, "perf_counter", now)

    def tick(msg):
        clock[0] += msg.startswith("step ")

    torch.manual_seed(0)
    head, state = mtp.new_head(model), {}
    first, _ = mtp_train.train_head(model, head, data, log=tick, state=state, time_limit=2.5, **kw)
    assert len(first) == 3 and state["step"] == 3
    second, _ = mtp_train.train_head(model, head, data, log=tick, state=state, **kw)
    assert len(second) == 3 and state["step"] == 6
    for (name, a), b in zip(straight.state_dict().items(), head.state_dict().values()):
        assert torch.equal(a, b), name


def test_cli_train_init_continues_from_a_trained_head(tmp_path):
    """`mtp.py train --init HEAD` starts from that head's weights: with the learning rate near zero it ends where
    the head began, while a run without --init ends at a fresh head; --init with --warm_start is refused."""
    model = sharp_tiny()
    torch.save(model.state_dict(), tmp_path / "model.pth")
    model.config.to_json(tmp_path / "config.json")
    torch.save(tiny_corpus(model), tmp_path / "data.pt")
    trained = tiny_head(model)
    mtp.save_head(tmp_path / "start.pth", trained, base="tiny", k=3)
    common = ["train", "--checkpoint_path", str(tmp_path / "model.pth"), "--device", "cpu", "--data",
              str(tmp_path / "data.pt"), "--steps", "2", "--batch_size", "4", "--lr", "1e-12", "--draft_vocab", "full"]
    mtp_train.main(common + ["--init", str(tmp_path / "start.pth"), "--out", str(tmp_path / "more.pth")])
    mtp_train.main(common + ["--out", str(tmp_path / "fresh.pth")])
    more, fresh = (torch.load(tmp_path / f, weights_only=True) for f in ("more.pth", "fresh.pth"))
    start = {n: t.bfloat16() for n, t in trained.state_dict().items()}
    assert all(torch.equal(more["state_dict"][n], t) for n, t in start.items())
    assert not torch.equal(fresh["state_dict"]["eh_proj.weight"], start["eh_proj.weight"])
    assert more["config"]["init"] == str(tmp_path / "start.pth") and fresh["config"]["init"] is None
    with pytest.raises(ValueError, match="give one"):
        mtp_train.main(common + ["--init", str(tmp_path / "start.pth"), "--warm_start"])


def test_vocabulary_sizes_as_the_issue_writes_them():
    assert [mtp_train.parse_size(s, 49152) for s in ("4k", "8K", "16k", "4096", "full", "49152")] == \
        [4096, 8192, 16384, 4096, 0, 0]
    for bad, message in (("4x", "not a number"), ("kk", "not a number"), ("64k", "out of range")):
        with pytest.raises(ValueError, match=message):
            mtp_train.parse_size(bad, 49152)


def test_loss_weights():
    assert [round(w, 2) for w in mtp.loss_weights(3)] == [0.51, 0.31, 0.18]
    assert mtp.loss_weights(1) == [1.0]


def test_depth_mask_small_case():
    m = mtp_train.depth_mask(3, 2).int()  # steps x anchors: rows/cols (1,0) (1,1) (1,2) (2,0) (2,1) (2,2)
    assert m.tolist() == [[1, 0, 0, 0, 0, 0],
                          [1, 1, 0, 0, 0, 0],
                          [1, 1, 1, 0, 0, 0],
                          [1, 0, 0, 1, 0, 0],
                          [1, 1, 0, 0, 1, 0],
                          [1, 1, 1, 0, 0, 1]]


# ----------------------------------------------------------------------------------------------- native MTP weights
def native_state(style, config, seed=0):
    """Random HF-named tensors for one native MTP layer (plus its shared copies and a main-model key)."""
    g = torch.Generator().manual_seed(seed)
    d, hd, I = config.dim, config.head_dim, config.intermediate_size
    pre = mtp.native_prefix(style, config)
    names = mtp.NATIVE_NAMES[style]
    shapes = {f"{names['hnorm']}.weight": (d,), f"{names['enorm']}.weight": (d,), f"{names['norm']}.weight": (d,),
              f"{names['eh_proj']}.weight": (d, 2 * d), "self_attn.q_proj.weight": (config.n_head * hd, d),
              "self_attn.k_proj.weight": (config.n_local_heads * hd, d),
              "self_attn.v_proj.weight": (config.n_local_heads * hd, d),
              "self_attn.o_proj.weight": (d, config.n_head * hd), "mlp.gate_proj.weight": (I, d),
              "mlp.up_proj.weight": (I, d), "mlp.down_proj.weight": (d, I), "input_layernorm.weight": (d,),
              "post_attention_layernorm.weight": (d,)}
    if config.attention_bias:
        shapes.update({f"self_attn.{x}_proj.bias": (s[0],) for x, s in
                       zip("qkv", [shapes[f"self_attn.{x}_proj.weight"] for x in "qkv"])})
    sd = {pre + n: torch.randn(s, generator=g) * 0.3 for n, s in shapes.items()}
    sd.update({pre + "embed_tokens.weight": torch.randn(config.vocab_size, d)} if style == "deepseek" else {})
    sd["model.norm.weight"] = torch.ones(d)
    return sd


@pytest.mark.parametrize("style,kw", [("mimo", {"attention_bias": True}), ("deepseek", {})])
@torch.no_grad()
def test_native_layer_maps_exactly_and_round_trips(style, kw, tmp_path):
    model = tiny(**kw)
    config = model.config
    sd = native_state(style, config)
    pre, d = mtp.native_prefix(style, config), config.dim
    state = mtp.head_state_from_native(sd, config, style)
    head = mtp.MTPHead(config)
    head.load_state_dict(state)  # strict: every key, every shape
    head.share(model)
    back = mtp.head_state_to_native(state, config, style)
    assert back.keys() == {k for k in sd if k.startswith(pre) and not k.endswith(mtp.SHARED_NAMES)}
    assert all(torch.equal(back[k], sd[k]) for k in back)
    # the fusion reads each layout's own concatenation order
    h, e = torch.randn(2, 5, d), torch.randn(2, 5, d)

    def rms(x, w):
        return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.norm_eps)
    names = mtp.NATIVE_NAMES[style]
    hn, en = rms(h, sd[pre + f"{names['hnorm']}.weight"]), rms(e, sd[pre + f"{names['enorm']}.weight"])
    cat = torch.cat([hn, en], -1) if style == "mimo" else torch.cat([en, hn], -1)
    torch.testing.assert_close(head.fuse(h, e), cat @ sd[pre + f"{names['eh_proj']}.weight"].T)
    # drafting runs with it, and pop_native_mtp leaves the main model's keys alone
    head.setup_caches(1, 16)
    y = head(h[:1], e[:1], torch.arange(5))
    assert head.sample(y[:, -1], GREEDY)[1].shape == (1, 101)
    ckpt = mtp.pop_native_mtp(sd, config, base="tiny")
    assert list(sd) == ["model.norm.weight"] and ckpt["config"]["source"] == style
    torch.save(ckpt, tmp_path / "mtp_head.pth")
    loaded = mtp.load_head(tmp_path / "mtp_head.pth", model)
    assert loaded.vocab_ids is None and all(torch.equal(a, state[n]) for n, a in loaded.state_dict().items())


@torch.no_grad()
def test_mimo_layer_equals_transformers_qwen2_layer():
    """MiMo's MTP layer = input_proj(cat(hidden_layernorm(h), token_layernorm(e))) -> Qwen2 decoder layer ->
    final_layernorm (vLLM's mimo_mtp.py), built here from transformers' own Qwen2 layer as the reference."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding
    model = tiny(attention_bias=True)
    c = model.config
    sd = native_state("mimo", c)
    cfg = Qwen2Config(hidden_size=c.dim, intermediate_size=c.intermediate_size, num_attention_heads=c.n_head,
                      num_key_value_heads=c.n_local_heads, rms_norm_eps=c.norm_eps, rope_theta=c.rope_base,
                      vocab_size=c.vocab_size, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    pre = "model.mtp_layers.0."
    layer = Qwen2DecoderLayer(cfg, layer_idx=0).eval()
    block = ("self_attn.", "mlp.", "input_layernorm.", "post_attention_layernorm.")
    layer.load_state_dict({k[len(pre):]: v for k, v in sd.items() if k[len(pre):].startswith(block)})
    norms = {n: Qwen2RMSNorm(c.dim, c.norm_eps) for n in ("hidden_layernorm", "token_layernorm", "final_layernorm")}
    for n, m in norms.items():
        m.weight.copy_(sd[pre + n + ".weight"])
    h, e = torch.randn(1, 7, c.dim), torch.randn(1, 7, c.dim)
    u = torch.cat([norms["hidden_layernorm"](h), norms["token_layernorm"](e)], -1) @ sd[pre + "input_proj.weight"].T
    pos = torch.arange(7)[None]
    out = layer(u, attention_mask=None, position_ids=pos, position_embeddings=Qwen2RotaryEmbedding(cfg)(u, pos))
    ref = norms["final_layernorm"](out[0] if isinstance(out, tuple) else out)
    head = mtp.MTPHead(c)
    head.load_state_dict(mtp.head_state_from_native(sd, c, "mimo"))
    head.setup_caches(1, 16)
    torch.testing.assert_close(head.norm(head(h, e, torch.arange(7))), ref, atol=1e-5, rtol=1e-4)


def test_native_head_from_a_lazy_source():
    """convert_hf_checkpoint reads tensors lazily: only the first MTP layer's are read, and every MTP layer's keys
    are set aside from the main model's conversion."""
    config = tiny().config
    sd = native_state("mimo", config)
    sd["model.mtp_layers.1.input_proj.weight"] = torch.zeros(1)

    class Lazy:
        read = []

        def keys(self):
            return sd.keys()

        def get(self, key):
            self.read.append(key)
            return sd[key]
    ckpt = mtp.native_head_checkpoint(Lazy(), config, base="tiny")
    assert ckpt["config"]["native_mtp_layers"] == 2 and ckpt["config"]["base"] == "tiny"
    assert Lazy.read and all(k.startswith("model.mtp_layers.0.") for k in Lazy.read)
    assert mtp.native_mtp_keys(sd.keys(), config) == set(sd) - {"model.norm.weight"}
    assert mtp.native_mtp_keys(["model.layers.1.mlp.up_proj.weight", "model.layers.2.eh_proj.weight"], config) == {
        "model.layers.2.eh_proj.weight"}  # tiny has 2 layers: index 2 is DeepSeek's MTP layer


def test_native_layer_errors():
    config = tiny().config
    sd = native_state("deepseek", config)
    del sd[mtp.native_prefix("deepseek", config) + "mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="missing model.layers.2.mlp.up_proj.weight"):
        mtp.head_state_from_native(sd, config, "deepseek")
    sd = native_state("deepseek", config)
    sd["model.layers.2.self_attn.q_a_proj.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="MLA attention"):
        mtp.head_state_from_native(sd, config, "deepseek")
    assert mtp.pop_native_mtp({"model.norm.weight": torch.ones(3)}, config) is None


# ---------------------------------------------------------------------------------------------- distillation prompts
def test_distillation_prompts_are_distinct_reproducible_and_not_evaluation_prompts(tmp_path):
    prompts = mtp_train.build_prompts(300, seed=0)
    assert len(set(prompts)) == 300 and prompts == mtp_train.build_prompts(300, seed=0)
    assert prompts != mtp_train.build_prompts(300, seed=1)
    fake = tmp_path / "dev.jsonl"  # negative control: the check must catch an equal prompt
    fake.write_text(json.dumps({"category": "chat", "prompt": prompts[7]}) + "\n")
    with pytest.raises(ValueError, match="equal evaluation prompts"):
        mtp_train.check_no_dev_overlap(prompts, fake)
    kept = mtp_train.build_prompts(300, seed=0, exclude=mtp_train.eval_prompts(fake))
    assert prompts[7] not in kept and len(set(kept)) == 300 and mtp_train.check_no_dev_overlap(kept, fake)
    dev = mtp_train.dev_prompts_path()
    if dev is None:
        pytest.skip("no ../shared/prompts/dev.jsonl here: only the negative control ran")
    assert mtp_train.check_no_dev_overlap(mtp_train.build_prompts(3000, seed=0), dev)


class CharChat:
    """A stand-in tokenizer for TINY's 101 ids: a chat is [1, 2, 3] + the message's characters + [7] (turn end)."""
    eos_ids = {7}

    def apply_chat_template(self, messages, add_generation_prompt=True):
        return [1, 2, 3] + [ord(c) % 50 + 20 for c in messages[0]["content"]] + [7]

    def decode(self, ids):
        return "".join(chr(65 + i % 26) for i in ids)


def test_model_written_prompts_are_finished_distinct_and_reproducible():
    tok, model = CharChat(), tiny(seed=3)
    assert mtp_train.user_turn_prefix(tok) == [1, 2, 3]
    torch.manual_seed(0)
    first = mtp_train.model_prompts(model, tok, 6, batch_size=8, max_tokens=40, log=lambda *_: None)
    torch.manual_seed(0)
    again = mtp_train.model_prompts(model, tok, 6, batch_size=8, max_tokens=40, log=lambda *_: None)
    assert first == again and len(set(first)) == 6 and all(len(t) >= 10 for t in first)
    torch.manual_seed(0)  # an evaluation prompt the model writes is dropped, and another message takes its place
    other = mtp_train.model_prompts(model, tok, 6, batch_size=8, max_tokens=40, log=lambda *_: None,
                                    exclude={first[2]})
    assert first[2] not in other and len(set(other)) == 6 and other[:2] == first[:2]
    torch.manual_seed(0)  # the messages' sampling is the caller's (`mtp.py distill --prompt_temperature`)
    cool = mtp_train.model_prompts(model, tok, 6, batch_size=8, max_tokens=40, log=lambda *_: None,
                                   s=replace(mtp_train.USER_TURN_SAMPLING, temperature=0.5))
    assert len(set(cool)) == 6 and cool != first
    with pytest.raises(ValueError, match="--prompt_temperature must be positive"):  # greedy: one message, repeated
        mtp_train.main(["distill", "--prompt_source", "model", "--prompt_temperature", "0", "--device", "cpu"])
    tok.eos_ids = set()  # negative control: no message ever ends its turn, so none may be kept
    with pytest.raises(ValueError, match="usable messages"):
        mtp_train.model_prompts(model, tok, 2, batch_size=8, max_tokens=8, log=lambda *_: None)


def test_user_turn_prefix_of_the_smollm2_template(smollm2_checkpoint):
    from tokenizer import get_tokenizer
    tok = get_tokenizer(smollm2_checkpoint)
    text = tok.decode(mtp_train.user_turn_prefix(tok))
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n<|im_start|>user\n"), text


def test_cli_distill_at_temperature_0_writes_the_models_greedy_responses(smollm2_checkpoint, tmp_path):
    """`mtp.py distill --temperature 0` (greedy self-distillation, the text a greedy run verifies): each response is
    the model's own greedy continuation of its prompt, and the file says how it was sampled."""
    from tokenizer import get_tokenizer
    out = tmp_path / "greedy.pt"
    mtp_train.main(["distill", "--checkpoint_path", str(smollm2_checkpoint / "model.pth"), "--device", "cpu",
                    "--num_prompts", "2", "--max_new_tokens", "32", "--batch_size", "1", "--temperature", "0",
                    "--out", str(out)])
    data = torch.load(out, weights_only=True)
    assert data["meta"]["sampling"]["temperature"] == 0 and data["meta"]["prompt_temperature"] is None
    model, tokenizer = load_model(smollm2_checkpoint / "model.pth"), get_tokenizer(smollm2_checkpoint)
    offsets, plens, ids = data["offsets"], data["prompt_lens"], data["ids"].tolist()
    for i in range(2):
        row = ids[offsets[i]:offsets[i + 1]]
        prompt, response = row[:plens[i]], row[plens[i]:]
        assert response and response == generate(model, [prompt], 32, stop_ids=tokenizer.eos_ids)[0]


# ---------------------------------------------------------------------------------------------- the real SmolLM2
needs_dev_prompts = pytest.mark.skipif(not DEV_PROMPTS.is_file(), reason=f"no evaluation prompts at {DEV_PROMPTS}")


@pytest.mark.skipif(not SHIPPED_HEAD.is_file(), reason=f"no trained head at {SHIPPED_HEAD}")
@needs_dev_prompts
@pytest.mark.parametrize("tree", [None, (2, 2, 1)])
@torch.no_grad()
def test_smollm2_shipped_head_greedy_text_equals_the_target_alone(tree, smollm2_checkpoint):
    """The shipped head on a few evaluation prompts (one per category), float32 on CPU, as a chain of 3 and as a
    draft tree: the greedy text is the target's own, and the head really drafts (more than one token accepted per
    step on average)."""
    from spec_tree import DraftTree
    from tokenizer import get_tokenizer
    model = load_model(smollm2_checkpoint / "model.pth")
    tokenizer = get_tokenizer(smollm2_checkpoint)
    rows = [json.loads(line) for line in DEV_PROMPTS.read_text().splitlines() if line.strip()]
    prompts = list({r["category"]: r["prompt"] for r in reversed(rows)}.values())
    tree = tree and DraftTree(tree)
    drafter, accepted = mtp.MTPDrafter(mtp.load_head(SHIPPED_HEAD, model), model, tree=tree), []
    for text in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        want = generate(model, [ids], 48, stop_ids=tokenizer.eos_ids)
        got = speculative_generate(model, drafter, [ids], 48, GREEDY, 3, stop_ids=tokenizer.eos_ids, accepted=accepted)
        assert got == want, text
    # the shipped head accepts ~0.9-1.0 drafts per step on these prompts (BENCHMARKS.md); a broken head accepts ~0
    assert sum(accepted) / len(accepted) > 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not SHIPPED_HEAD.is_file(), reason=f"no trained head at {SHIPPED_HEAD}")
@needs_dev_prompts
@torch.no_grad()
def test_cuda_smollm2_shipped_head_greedy_bf16_text_equals_the_target_alone(smollm2_checkpoint):
    """On the GPU in bfloat16, through the Triton GEMVs and decode attention: every dev prompt's greedy text with the
    head is the target's own. A verify of 4 rows runs the one-row GEMV's arithmetic (gemv.py, gemv_config), so not
    even a near-tie may part them. It guards the tiles: in session 43 a w2 tile whose sums differ between one row
    and four left 14 of 24 prompts different in scripts/spec_eval.py, each at a near-tie, and the unit test in
    tests/test_gemv.py did not see it."""
    from tokenizer import get_tokenizer
    model = load_model(smollm2_checkpoint / "model.pth", device="cuda", dtype=torch.bfloat16)
    tokenizer = get_tokenizer(smollm2_checkpoint)
    prompts = [json.loads(line)["prompt"] for line in DEV_PROMPTS.read_text().splitlines() if line.strip()]
    drafter = mtp.MTPDrafter(mtp.load_head(SHIPPED_HEAD, model), model)
    differ = []
    for text in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        want = generate(model, [ids], 96, stop_ids=tokenizer.eos_ids)
        got = speculative_generate(model, drafter, [ids], 96, GREEDY, 3, stop_ids=tokenizer.eos_ids)
        differ += [] if got == want else [text]
    assert not differ, f"{len(differ)} of {len(prompts)} differ: {differ[:3]}"

