"""Training the MTP head of mtp.py: self-distilled data, the compressed draft vocabulary, the training loop.

    python mtp.py distill --out mtp_data.pt --num_prompts 8192 --max_new_tokens 256 --prompt_source mixed
    python mtp.py vocab --data mtp_data.pt --size 16384 --out vocab.pt         # coverage of each size, printed
    python mtp.py train --data mtp_data.pt --k 3 --steps 3000 --batch_size 32  # -> <checkpoint dir>/mtp_head.pth

(`python mtp_train.py ...` is the same.) Training choices: the head starts from PyTorch's default init (norms at 1).
A warm start -- block copied from the target's last layer, final norm from the target's (--warm_start) -- trained
slower in two short CPU runs on SmolLM2 (higher loss and lower held-out agreement at every evaluation): that layer
expects the target's residual stream, not eh_proj's output, and has to unlearn it first. Targets are "soft" by
default: cross-entropy against the frozen target's own next-token distribution softmax(output(h_{t+k})), exactly
what acceptance rewards and free since h is there anyway (logged as KL(p || q): same gradient, 0 at a perfect
match); or "hard": the distilled tokens. Both only on response tokens, weighted alpha_k = 0.6^(k-1) normalized. The
target's hidden states are computed once for the whole corpus (it is frozen), so a training step costs only the
head. With a compressed vocabulary the draft logits are F.linear(h, output.weight[vocab_ids]); a target token
outside the list has no logit: hard targets ignore it, soft targets drop its mass (it can never be drafted, only
verified). Verification always uses the full vocabulary, so the output is unchanged: the draft only decides how many
tokens each target forward yields.
"""
import argparse
import ast
import functools
import json
import math
import random
import sys
import sysconfig
import time
import unicodedata
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from generate import Sampling, check_device, generate, load_model, resolve_checkpoint, synchronize
from mtp import MTP_HEAD_FILE, MTPHead, loss_weights, new_head, output_weight, read_head, save_head
from model import Transformer, rope_tables

DISTILL_SAMPLING = Sampling(temperature=0.6, top_k=20, top_p=0.95)  # FastMTP's self-distillation sampling


# ---------------------------------------------------------------------------------------------------------- training
def depth_mask(L: int, k: int, device=None):
    """(kL, kL) bool: which (step, anchor) keys a (step, anchor) query sees when drafting. Rows/cols are step-major.
    Step 1 is causal over anchors; step a > 1 at anchor t sees step 1 at anchors <= t and steps 2..a at t."""
    step = torch.arange(k, device=device).repeat_interleave(L)  # (kL,)
    anchor = torch.arange(L, device=device).repeat(k)
    qs, qa, ks, ka = step[:, None], anchor[:, None], step[None, :], anchor[None, :]
    return ((ks == 0) & (ka <= qa)) | ((ks > 0) & (ks <= qs) & (ka == qa))


def teacher_forced_logits(head: MTPHead, model: Transformer, hidden, x, k: int, weight):
    """hidden (B, T, D) target states, x (B, T) tokens -> k logits (B, L, N), L = T-k-1: entry [:, t] of step i
    (1-based) predicts x[:, t+i+1] from h_t and x[:, t+1..t+i], seeing what drafting at anchor t sees."""
    B, T, D = hidden.shape
    L = T - k - 1
    c = head.config
    cos, sin = rope_tables(T, c.head_dim, c.rope_base, c.rope_scaling, hidden.device)
    pos = torch.cat([torch.arange(L, device=hidden.device) + i for i in range(k)])  # step i+1 at anchor t: t+i
    mask = depth_mask(L, k, hidden.device)
    y, inputs, out = hidden[:, :L], [], []
    for i in range(k):
        inputs.append(head.fuse(y, model.tok_embeddings(x[:, i + 1:i + 1 + L])))
        n = (i + 1) * L
        # the block reruns steps < i+1 as keys for this step (one layer: cheaper than a custom attention)
        y = head.block(torch.cat(inputs, 1), (cos, sin, pos[None, :n]), mask[:n, :n], None)[:, i * L:]
        out.append(F.linear(head.norm(y), weight))
    return out


def load_corpus(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"distilled data {path} not found; make it with `python mtp.py distill --out {path}`")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not {"ids", "offsets", "prompt_lens"} <= set(data):
        raise ValueError(f"{path} is not an `mtp.py distill` file (needs ids, offsets, prompt_lens)")
    return data


@torch.no_grad()
def corpus_hidden(model: Transformer, data: dict, batch_tokens: int = 16384, log=print):
    """The frozen target's final-normed states for every corpus token, (N_tok, D), computed once on its device."""
    device = model.norm.weight.device
    offsets, ids = data["offsets"], data["ids"].long()
    lens = (offsets[1:] - offsets[:-1]).tolist()
    out = torch.empty(len(ids), model.config.dim, dtype=model.norm.weight.dtype, device=device)
    order = sorted(range(len(lens)), key=lambda i: lens[i])  # similar lengths together: little padding
    batches, rows = [], []
    for r in order:
        if rows and (len(rows) + 1) * lens[r] > batch_tokens:
            batches.append(rows)
            rows = []
        rows.append(r)
    batches.append(rows)
    t0, done = time.perf_counter(), 0
    for rows in batches:
        T = lens[rows[-1]]
        x = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):
            x[b, :lens[r]] = ids[offsets[r]:offsets[r + 1]]
        h = model(x.to(device), return_hidden=True)[1]  # (B, T, D); right padding never affects earlier positions
        for b, r in enumerate(rows):
            out[offsets[r]:offsets[r + 1]] = h[b, :lens[r]]
        done += sum(lens[r] for r in rows)
    synchronize(str(device))
    log(f"target hidden states: {done} tokens in {time.perf_counter() - t0:.1f} s")
    return out


def make_batch(ids, hidden, offsets, prompt_lens, rows):
    """rows (B,) of the corpus -> x (B, T), h (B, T, D), response mask (B, T); right-padded with zeros."""
    start, n = offsets[rows], offsets[rows + 1] - offsets[rows]
    T = int(n.max())
    ar = torch.arange(T, device=ids.device)
    idx = (start[:, None] + ar).clamp(max=len(ids) - 1)  # (B, T)
    valid = ar < n[:, None]
    x = ids[idx] * valid
    h = hidden[idx] * valid[..., None]
    return x, h, valid & (ar >= prompt_lens[rows][:, None])


def mtp_loss(head, model, x, h, resp, k, weight, vocab_ids, targets="soft"):
    """Sum of alpha_i * CE_i over response tokens (soft: as a KL divergence, same gradient), plus correct (B, L)
    per step: the draft's top-1 equals the target's argmax."""
    L = x.shape[1] - k - 1
    logits = teacher_forced_logits(head, model, h, x, k, weight)
    with torch.no_grad():
        full = F.linear(h, output_weight(model))  # (B, T, V): the target's own next-token logits at every t
        argmax = full.argmax(-1)  # (B, T)
        if targets == "soft":
            lse = torch.logsumexp(full.float(), -1, keepdim=True)
            p = (full if vocab_ids is None else full[..., vocab_ids]).float().sub_(lse).exp_()  # (B, T, N)
        else:
            index = torch.full((head.vocab_size,), -100, dtype=torch.long, device=x.device)
            index[vocab_ids if vocab_ids is not None else slice(None)] = torch.arange(weight.shape[0], device=x.device)
    loss, correct = 0.0, []
    for i, (lg, a) in enumerate(zip(logits, loss_weights(k))):  # step i+1 at anchor t predicts x[t+i+2]
        m = resp[:, i + 2:i + 2 + L]  # (B, L)
        logq = F.log_softmax(lg.float(), -1)
        if targets == "soft":  # KL(p || q) over the list: CE minus the target's entropy, 0 when the head matches
            pi = p[:, i + 1:i + 1 + L]
            ce = (torch.xlogy(pi, pi) - pi * logq).sum(-1)
        else:
            ce = F.nll_loss(logq.transpose(1, 2), index[x[:, i + 2:i + 2 + L]], reduction="none", ignore_index=-100)
        loss = loss + a * (ce * m).sum() / m.sum().clamp(min=1)
        pred = lg.argmax(-1) if vocab_ids is None else vocab_ids[lg.argmax(-1)]
        correct.append((pred == argmax[:, i + 1:i + 1 + L]) | ~m)  # a masked position counts as right: see eval
    return loss, correct


@torch.no_grad()
def evaluate(head, model, ids, hidden, offsets, prompt_lens, rows, k, weight, vocab_ids, batch_size):
    """Per-step top-1 agreement with the target's greedy token on held-out rows, and the mean accepted length a
    greedy run would see if the distilled text were greedy (1 + sum of the fractions where steps 1..i all agree)."""
    hits, chain, count, count_all = torch.zeros(k), torch.zeros(k), torch.zeros(k), 0.0
    for b in range(0, len(rows), batch_size):
        x, h, resp = make_batch(ids, hidden, offsets, prompt_lens, rows[b:b + batch_size])
        if x.shape[1] < k + 2:
            continue
        L = x.shape[1] - k - 1
        _, correct = mtp_loss(head, model, x, h, resp, k, weight, vocab_ids)
        all_ok = torch.ones_like(correct[0])
        every = resp[:, 2:2 + L] & resp[:, k + 1:k + 1 + L]  # anchors whose k targets are all response tokens
        for i in range(k):
            m = resp[:, i + 2:i + 2 + L]
            hits[i] += (correct[i] & m).sum().item()
            count[i] += m.sum().item()
            all_ok &= correct[i]
            chain[i] += (all_ok & every).sum().item()
        count_all += every.sum().item()
    acc = (hits / count.clamp(min=1)).tolist()
    return acc, 1 + (chain / max(count_all, 1)).sum().item()


def train_head(model: Transformer, head: MTPHead, data: dict, *, k: int = 3, steps: int = 1000, batch_size: int = 16,
               lr: float = 1e-3, warmup: Optional[int] = None, weight_decay: float = 0.01, vocab_ids=None,
               targets: str = "soft", val_frac: float = 0.05, eval_every: int = 250, seed: int = 0, log=print,
               state: Optional[dict] = None, time_limit: Optional[float] = None):
    """Train the head's weights only (the target is frozen). Returns the training losses (one per step run here)
    and the held-out evaluations [(step, per-step agreement, est. greedy accepted length)].

    Resumable, so a run can span several sessions of limited length: `state` (a dict, usually {}) receives the
    optimizer, schedule and step when the run stops, after `steps` or once `time_limit` seconds have passed; pass
    it back (with the head as it was left) to continue. Batch i is drawn from a generator seeded by (seed, i), so
    a resumed run sees the batches an uninterrupted one would."""
    if targets not in ("soft", "hard"):
        raise ValueError(f"targets must be 'soft' or 'hard', got {targets!r}")
    device = model.norm.weight.device
    cuda = device.type == "cuda"
    for p in model.parameters():
        p.requires_grad_(False)
    hidden = corpus_hidden(model, data, log=log)
    ids, offsets = data["ids"].to(device, torch.long), data["offsets"].to(device)
    prompt_lens = data["prompt_lens"].to(device, torch.long)
    n = len(offsets) - 1
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    n_val = min(max(1, int(n * val_frac)), n - 1) if n > 1 else 0
    val, train = perm[:n_val], perm[n_val:]
    vocab_ids = None if vocab_ids is None else vocab_ids.to(device, torch.long)
    weight = output_weight(model)
    weight = weight if vocab_ids is None else weight[vocab_ids]  # (N, D): the draft's output rows
    warmup = max(1, steps // 20) if warmup is None else warmup
    opt = torch.optim.AdamW([p for p in head.parameters()], lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                            fused=cuda)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0, i - warmup) / max(1, steps - warmup))))))
    autocast = torch.autocast("cuda", torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    gen = torch.Generator(device=device)
    first = 1
    if state:
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        first = state["step"] + 1
        log(f"resuming at step {first}/{steps}")
    losses, evals, t0, tokens = [], [], time.perf_counter(), 0
    head.train()
    step = first - 1
    for step in range(first, steps + 1):
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            step -= 1
            log(f"time limit of {time_limit:.0f} s reached after step {step}/{steps}; resume to go on")
            break
        gen.manual_seed(seed * 1_000_003 + step)
        rows = train[torch.randint(len(train), (batch_size,), device=device, generator=gen)]
        x, h, resp = make_batch(ids, hidden, offsets, prompt_lens, rows)
        if x.shape[1] < k + 2:
            continue
        with autocast:
            loss, _ = mtp_loss(head, model, x, h, resp, k, weight, vocab_ids, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.item())
        tokens += int(resp.sum())
        if step % max(1, steps // 100) == 0 or step == steps:
            dt = time.perf_counter() - t0
            recent = losses[-10:]
            log(f"step {step}/{steps} | loss {sum(recent) / len(recent):.3f} | lr {schedule.get_last_lr()[0]:.2e} | "
                f"{tokens / dt:,.0f} response tok/s | ETA {fmt_time(dt / (step - first + 1) * (steps - step))}")
        if n_val and (step % eval_every == 0 or step == steps):
            head.eval()
            with autocast:
                acc, tau = evaluate(head, model, ids, hidden, offsets, prompt_lens, val, k, weight, vocab_ids,
                                    batch_size)
            head.train()
            evals.append((step, acc, tau))
            log(f"  held-out ({n_val} samples): top-1 agreement with the target per step "
                f"{' '.join(f'{a:.3f}' for a in acc)} | est. greedy accepted length {tau:.2f} (max {k + 1})")
    head.eval()
    if state is not None:
        state.update(optimizer=opt.state_dict(), schedule=schedule.state_dict(), step=step)
    return losses, evals


def fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


# ------------------------------------------------------------------------------------------------------- vocabulary
def token_ranking(data: dict, vocab_size: int) -> torch.Tensor:
    """All ids ordered by how often they occur as RESPONSE tokens in the corpus (ties by id): what a draft must
    predict. Its first N ids are the compressed draft vocabulary."""
    ids, offsets, plens = data["ids"].long(), data["offsets"], data["prompt_lens"].long()
    pos = torch.arange(len(ids))
    row = torch.searchsorted(offsets, pos, right=True) - 1
    resp = pos >= offsets[row] + plens[row]
    counts = torch.bincount(ids[resp], minlength=vocab_size)
    return torch.sort(-counts, stable=True).indices


def coverage(data: dict, rank: torch.Tensor, sizes) -> dict:
    ids, offsets, plens = data["ids"].long(), data["offsets"], data["prompt_lens"].long()
    pos = torch.arange(len(ids))
    row = torch.searchsorted(offsets, pos, right=True) - 1
    resp = ids[pos >= offsets[row] + plens[row]]
    where = torch.empty_like(rank)
    where[rank] = torch.arange(len(rank))
    r = where[resp]
    return {n: (r < n).float().mean().item() for n in sizes}


def parse_size(size: str, vocab_size: int) -> int:
    """'full' (0), a token count, or thousands as the sizes are usually written: 4k = 4096, 16k = 16384."""
    text = str(size).lower()
    if text == "full":
        return 0
    if not text.rstrip("k").isdigit() or text.count("k") > 1:
        raise ValueError(f"vocabulary size {size!r} is not a number, a number with k (4k = 4096) or 'full'")
    n = int(text.rstrip("k")) * (1024 if text.endswith("k") else 1)
    if not 0 < n <= vocab_size:
        raise ValueError(f"vocabulary size {n} is out of range; use 1..{vocab_size} or 'full'")
    return 0 if n == vocab_size else n


# ------------------------------------------------------------------------------------------------------ distillation
# Prompts are built from text every Python install has, so the set is reproducible anywhere and unrelated to the
# evaluation prompts: everyday things are the names of Unicode pictographs (unicodedata: "hot beverage",
# "bicycle", "sunflower"), technical topics and paragraphs are the first sentences and paragraphs of the standard
# library's own docstrings (read with ast, nothing imported), numbers come from a seeded RNG. Templates span the
# four kinds of chat use: conversation/explanation, code, math, and writing/rewriting.
# `--prompt_source model|mixed` adds user messages the model writes itself (model_prompts): the shipped SmolLM2
# head was trained on half of each, which lifted its acceptance on chat-style evaluation prompts (BENCHMARKS.md).
EVERYDAY = [
    "Write a short poem about a {t}.", "Tell me three surprising facts about the {t}.",
    "Explain to a ten-year-old what a {t} is.", "Write a short story in which a {t} plays an important part.",
    "What are the pros and cons of having a {t} at home?", "Describe a {t} in vivid detail.",
    "Give me five creative uses for a {t}.", "Write a product description for a {t}.",
    "Compare a {t} with a {u}: how are they alike and how do they differ?", "Write a haiku about a {t}.",
    "Write a friendly email inviting a colleague to come and see a {t}.", "What is the history of the {t}?",
    "Write a dialogue between a {t} and a {u}.", "Give me some tips for drawing a {t}.",
    "Write a limerick about a {t} and a {u}.", "How would you explain what a {t} is to someone from the year 1500?",
    "Plan a weekend activity for a family that involves a {t}.", "Write a riddle whose answer is \"{t}\".",
    "What could go wrong when you bring a {t} on a trip, and how do you prevent it?",
    "Write a short motivational speech that uses a {t} as a metaphor.",
]
TECHNICAL = [
    "Explain what the Python {kind} `{name}` is for. Its documentation says: \"{doc}\"",
    "In simple terms, what does this mean: \"{doc}\"?", "When would a programmer use `{name}` in Python?",
    "Write a Python function that does the following: {doc}", "Write a JavaScript function that does this: {doc}",
    "Write unit tests with pytest for a function described as: \"{doc}\"",
    "What are common mistakes when using `{name}`, and how do I avoid them?",
    "Give an example of using `{name}` in a small script, with comments.",
]
WRITING = [
    "Summarize the following text in one sentence:\n\n{para}", "Rewrite the following in plain language for a "
    "beginner:\n\n{para}", "Translate the following into French:\n\n{doc}", "Translate into Spanish: {doc}",
    "Turn the following into a bulleted list of key points:\n\n{para}",
    "Fix any grammar or style problems in this text and explain your changes:\n\n{para}",
    "Write three questions a student might ask after reading this:\n\n{para}",
    "Make this sentence more formal: {doc}",
]


def _math_prompt(rng: random.Random, t: str) -> str:
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 999)
    return rng.choice([
        f"What is {a} + {b} * {c}? Show your steps.", f"Solve for x: {a}x + {b} = {c}.",
        f"A shop sells a {t} for ${a}.{b:02d}. How much do {c % 20 + 2} of them cost with a {b % 40 + 5}% discount?",
        f"A train travels {c} km at {a + 20} km/h. How long does the trip take, in hours and minutes?",
        f"Is {c * 2 + 1} a prime number? Explain how you check.", f"Convert {a} degrees Celsius to Fahrenheit.",
        f"What is {b}% of {c}?", f"What is the sum of the integers from 1 to {c}?",
        f"A rectangle is {a} cm by {b} cm. What are its area and perimeter?",
        f"If I save ${a} a week, how many weeks until I have ${c * 10}?",
        f"Simplify the fraction {a * 6}/{b * 6}.", f"What is the average of {a}, {b} and {c}?",
    ])


@functools.lru_cache(maxsize=1)
def _pictograph_names() -> tuple:
    names = []
    for lo, hi in [(0x1F300, 0x1F5FF), (0x1F680, 0x1F6FF), (0x1F900, 0x1F9FF), (0x1FA70, 0x1FAFF)]:
        for cp in range(lo, hi + 1):
            n = unicodedata.name(chr(cp), "")
            if n and len(n.split()) <= 3 and not any(w in n for w in ("SIGN", "SYMBOL", "MARK", "FACE", "WITH",
                                                                       "SQUARED", "TYPE", "BLACK", "WHITE", "LEFT",
                                                                       "RIGHT", "DIGIT")):
                names.append(n.lower())
    return tuple(names)


@functools.lru_cache(maxsize=1)
def _stdlib_docs() -> tuple:
    """(kind, name, first sentence, first paragraph) of public stdlib modules, classes and functions."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "ensurepip",
            "__pycache__", "tkinter", "pydoc_data", "encodings"}
    out = []
    for path in sorted([*root.glob("*.py"), *root.glob("*/*.py")]):  # modules and packages' first level
        rel = path.relative_to(root)
        if any(p in skip or p.startswith(("config-", "_")) for p in rel.parts[:-1]) or (
                rel.name.startswith("_") and rel.name != "__init__.py"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        mod = ".".join(rel.parent.parts if rel.name == "__init__.py" else rel.with_suffix("").parts)
        nodes = [("module", mod, tree)] + [
            ("class" if isinstance(n, ast.ClassDef) else "function", f"{mod}.{n.name}", n) for n in tree.body
            if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and not n.name.startswith("_")]
        for kind, name, node in nodes:
            doc = ast.get_docstring(node) or ""
            para = " ".join(doc.split("\n\n")[0].split())
            sentence = para.split(". ")[0].rstrip(".") + "."
            if 25 <= len(sentence) <= 200 and para.isascii() and "$" not in para and ">>>" not in para:
                out.append((kind, name, sentence, para[:600]))
    return tuple(out)


def build_prompts(n: int, seed: int = 0, exclude=frozenset()) -> list:
    """n distinct prompts, none in exclude: 35% everyday, 25% technical/code, 20% math, 20% writing."""
    rng = random.Random(seed)
    things, docs = _pictograph_names(), _stdlib_docs()
    if len(things) < 50 or len(docs) < 50:
        raise ValueError(f"found only {len(things)} pictograph names and {len(docs)} stdlib docstrings; this Python "
                         f"install lacks its standard library sources")
    out, seen = [], set(exclude)
    for _ in range(50 * n + 1000):
        if len(out) == n:
            return out
        r, t, u = rng.random(), rng.choice(things), rng.choice(things)
        kind, name, doc, para = rng.choice(docs)
        if r < 0.35:
            p = rng.choice(EVERYDAY).format(t=t, u=u)
        elif r < 0.6:
            p = rng.choice(TECHNICAL).format(kind=kind, name=name, doc=doc)
        elif r < 0.8:
            p = _math_prompt(rng, t)
        else:
            p = rng.choice(WRITING).format(doc=doc, para=para)
        if p not in seen:
            seen.add(p)
            out.append(p)
    raise ValueError(f"could not build {n} distinct prompts; ask for fewer")


USER_TURN_SAMPLING = Sampling(temperature=1.0, top_p=0.95)


def user_turn_prefix(tokenizer) -> list:
    """The chat template's ids up to where a user message's text begins: the common prefix of two one-message
    chats that differ only in that text, so no template is spelled out here."""
    a, b = (tokenizer.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=False)
            for c in ("A", "B"))
    n = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    return a[:n]


@torch.no_grad()
def model_prompts(model: Transformer, tokenizer, n: int, batch_size: int = 64, max_tokens: int = 96,
                  decode_fn=None, log=print, exclude=frozenset(), s: Sampling = USER_TURN_SAMPLING) -> list:
    """n distinct user messages written by the model itself: it continues the template's opening of a user turn
    and stops where the turn ends (Magpie, arXiv 2406.08464). They follow the kind of request the chat model
    was tuned on, which built templates only approximate; a message that ran past max_tokens is dropped, and so
    is one in exclude (a model that writes thousands of questions writes some evaluation prompt word for word).
    SmolLM2-135M's are often incoherent at Magpie's temperature 1.0 and plain requests at 0.7 (BENCHMARKS.md)."""
    from generate import decode_one_token
    prefix, stop = user_turn_prefix(tokenizer), set(tokenizer.eos_ids)
    out, seen, t0, tries = [], set(exclude), time.perf_counter(), 0
    while len(out) < n:
        if tries > 20 * n:
            raise ValueError(f"the model wrote only {len(out)} distinct usable messages in {tries} tries (a base "
                             f"model may never end a user turn); ask for fewer or use --prompt_source built")
        rows = generate(model, [prefix] * batch_size, max_tokens, s, stop_ids=stop,
                        decode_fn=decode_fn or decode_one_token)
        tries += batch_size
        for r in rows:
            if not (r and r[-1] in stop):  # generate() ends a row at its first stop id: no stop, no finished turn
                continue
            text = tokenizer.decode(r[:-1]).strip()
            if 10 <= len(text) and text not in seen and len(out) < n:
                seen.add(text)
                out.append(text)
        dt = time.perf_counter() - t0
        log(f"model-written prompts: {len(out)}/{n} kept of {tries} | {tries / dt:.1f} tries/s")
    return out


def dev_prompts_path() -> Optional[Path]:
    here = Path(__file__).resolve().parent
    for p in (here.parent / "shared/prompts/dev.jsonl", here / "shared/prompts/dev.jsonl"):
        if p.is_file():
            return p
    return None


def eval_prompts(dev_path: Optional[Path]) -> set:
    """The evaluation prompts' texts, read only so that no distillation prompt equals one."""
    if dev_path is None:
        return set()
    return {json.loads(l)["prompt"].strip() for l in Path(dev_path).read_text().splitlines() if l.strip()}


def check_no_dev_overlap(prompts: list, dev_path: Optional[Path]) -> bool:
    """Raise if any prompt equals an evaluation prompt; False if there is no file to check against."""
    if dev_path is None:
        return False
    dev = eval_prompts(dev_path)
    same = [p for p in prompts if p.strip() in dev]
    if same:
        raise ValueError(f"{len(same)} distillation prompts equal evaluation prompts in {dev_path}, e.g. {same[0]!r}; "
                         f"change --seed")
    return True


@torch.no_grad()
def distill(model: Transformer, prompts: list, max_new_tokens: int, batch_size: int, stop_ids=(),
            s: Sampling = DISTILL_SAMPLING, decode_fn=None, log=print, time_limit: Optional[float] = None) -> dict:
    """Generate a response to each prompt (token ids, chat template already applied) with the model itself,
    batch_size prompts at a time -> {ids (flat int32), offsets (N+1,), prompt_lens (N,)}. With time_limit, no batch
    starts after that many seconds (the first always runs): the prompts answered so far make the corpus."""
    from generate import decode_one_token
    max_seq = max(len(p) for p in prompts) + max_new_tokens  # one cache shape for every batch
    seqs, plens, t0, new = [], [], time.perf_counter(), 0
    n_batches = (len(prompts) + batch_size - 1) // batch_size
    for b in range(n_batches):
        if b and time_limit is not None and time.perf_counter() - t0 > time_limit:
            log(f"time limit of {time_limit:.0f} s reached: {len(seqs)} of {len(prompts)} prompts answered")
            break
        batch = prompts[b * batch_size:(b + 1) * batch_size]
        out = generate(model, batch, max_new_tokens, s, stop_ids=stop_ids, max_seq_length=max_seq,
                       decode_fn=decode_fn or decode_one_token)
        for p, r in zip(batch, out):
            seqs.append(list(p) + r)
            plens.append(len(p))
            new += len(r)
        dt = time.perf_counter() - t0
        log(f"batch {b + 1}/{n_batches}: {new:,} response tokens | {new / dt:,.0f} tok/s | "
            f"ETA {fmt_time(dt / (b + 1) * (n_batches - b - 1))}")
    lens = torch.tensor([len(x) for x in seqs])
    return {"ids": torch.tensor([t for x in seqs for t in x], dtype=torch.int32),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]),
            "prompt_lens": torch.tensor(plens, dtype=torch.int32)}


# --------------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q):
        q.add_argument("--checkpoint_path", default=None, help="target model.pth (default: the embedded SmolLM2)")
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
        q.add_argument("--seed", type=int, default=0, help="random seed")

    d = sub.add_parser("distill", help="generate self-distillation data with the target itself")
    common(d)
    d.add_argument("--out", default="mtp_data.pt", help="output file (token ids, prompt lengths)")
    d.add_argument("--num_prompts", type=int, default=1024, help="how many prompts")
    d.add_argument("--prompt_source", choices=["built", "model", "mixed"], default="built",
                   help="built: templates over stdlib text; model: user messages the model writes itself; "
                        "mixed: half each")
    d.add_argument("--max_new_tokens", type=int, default=256, help="response tokens per prompt at most")
    d.add_argument("--batch_size", type=int, default=64, help="prompts generated together")
    d.add_argument("--compile", action="store_true",
                   help="compile the decode step (a CUDA graph); pays off only for long runs")
    d.add_argument("--temperature", type=float, default=DISTILL_SAMPLING.temperature,
                   help=f"the responses' sampling temperature, with top-k {DISTILL_SAMPLING.top_k} and top-p "
                        f"{DISTILL_SAMPLING.top_p} (FastMTP's {DISTILL_SAMPLING.temperature}); 0: greedy, the text a "
                        "greedy run verifies")
    d.add_argument("--prompt_temperature", type=float, default=USER_TURN_SAMPLING.temperature,
                   help=f"sampling temperature of the user messages the model writes, with top-p "
                        f"{USER_TURN_SAMPLING.top_p} (Magpie's {USER_TURN_SAMPLING.temperature})")
    d.add_argument("--exclude", default=None, help="evaluation prompts (jsonl) no distillation prompt may equal "
                                                   "(default: ../shared/prompts/dev.jsonl when present)")
    d.add_argument("--time_limit", type=float, default=None,
                   help="stop starting new batches after this many seconds of generating responses; the prompts "
                        "are shuffled first, so a cut corpus keeps the mix")

    v = sub.add_parser("vocab", help="rank tokens by frequency in the distilled responses")
    v.add_argument("--data", required=True, help="output of `mtp.py distill`")
    v.add_argument("--size", default="8192", help="draft vocabulary size: a number, 4k/8k/16k or 'full'")
    v.add_argument("--out", default="vocab.pt", help="output file (the ranking and the size)")

    t = sub.add_parser("train", help="train the MTP head on distilled data")
    common(t)
    t.add_argument("--data", required=True, help="output of `mtp.py distill`")
    t.add_argument("--out", default=None, help=f"head checkpoint (default: {MTP_HEAD_FILE} beside the target)")
    t.add_argument("--k", type=int, default=3, help="draft steps trained (and drafted by default)")
    t.add_argument("--steps", type=int, default=3000, help="optimizer steps")
    t.add_argument("--batch_size", type=int, default=32, help="sequences per step")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW, warm-up then cosine to 10%%)")
    t.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of --steps)")
    t.add_argument("--draft_vocab", default="16384",
                   help="draft vocabulary size (a number, 4k/8k/16k or 'full'), ranked from --data unless --vocab "
                        "is given")
    t.add_argument("--vocab", default=None, help="output of `mtp.py vocab` (its ranking and size)")
    t.add_argument("--targets", choices=["soft", "hard"], default="soft",
                   help="soft: the target's next-token distribution; hard: the distilled tokens")
    t.add_argument("--eval_every", type=int, default=250, help="held-out accuracy every this many steps")
    t.add_argument("--val_frac", type=float, default=0.05, help="fraction of samples held out")
    t.add_argument("--warm_start", action="store_true",
                   help="start the block from the target's last layer (FastMTP-style) instead of random init")
    t.add_argument("--init", default=None,
                   help="start from this trained head's weights (more training, e.g. on new data); the draft "
                        "vocabulary is chosen as without it")
    t.add_argument("--time_limit", type=float, default=None,
                   help="stop after this many seconds of training, saving the head and a .resume file beside it")
    t.add_argument("--resume", action="store_true", help="continue the run that --out's .resume file holds")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.cmd != "vocab":
        check_device(args.device)
    counts = {"distill": ("num_prompts", "max_new_tokens", "batch_size"),
              "train": ("k", "steps", "batch_size", "eval_every")}.get(args.cmd, ())
    for name in counts:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.cmd == "train" and args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.cmd == "train" and args.init and args.warm_start:
        raise ValueError("--init and --warm_start both set the starting weights; give one")
    if args.cmd == "train" and args.vocab and not Path(args.vocab).is_file():
        raise FileNotFoundError(f"vocabulary file {args.vocab} not found; make it with `python mtp.py vocab --data "
                                f"{args.data} --out {args.vocab}`, or leave out --vocab")
    if args.cmd == "distill" and not args.prompt_temperature > 0:  # greedy would write one message over and over
        raise ValueError(f"--prompt_temperature must be positive, got {args.prompt_temperature}")
    if args.cmd == "distill" and args.exclude and not Path(args.exclude).is_file():
        raise FileNotFoundError(f"--exclude {args.exclude} not found; give the evaluation prompts' jsonl, or leave it "
                                f"out to exclude ../shared/prompts/dev.jsonl where it exists")
    if args.cmd == "vocab":
        data = load_corpus(args.data)
        V = int(data.get("meta", {}).get("vocab_size", int(data["ids"].max()) + 1))
        size = parse_size(args.size, V)
        rank = token_ranking(data, V)
        cov = coverage(data, rank, [n for n in (1024, 4096, 8192, 16384, 32768) if n < V])
        print("response-token coverage: " + ", ".join(f"top {n}: {c:.4f}" for n, c in cov.items()))
        torch.save({"rank": rank.to(torch.int32), "size": size}, args.out)
        print(f"wrote {args.out}: {size or V} of {V} ids")
        return

    torch.manual_seed(args.seed)
    data = load_corpus(args.data) if args.cmd == "train" else None  # a wrong path fails before the model loads
    device = args.device
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    checkpoint = resolve_checkpoint(args.checkpoint_path)
    model = load_model(checkpoint, device, dtype)
    base = checkpoint.parent.name
    if args.cmd == "distill":
        from tokenizer import get_tokenizer
        tokenizer = get_tokenizer(checkpoint.parent)
        decode_fn = None
        if args.compile:
            from generate import compile_steps
            decode_fn = compile_steps(device, False)[1]
        n_model = {"built": 0, "model": args.num_prompts, "mixed": args.num_prompts // 2}[args.prompt_source]
        dev_path = Path(args.exclude) if args.exclude else dev_prompts_path()
        dev = eval_prompts(dev_path)
        texts = build_prompts(args.num_prompts - n_model, args.seed, exclude=dev)
        if n_model:
            torch.manual_seed(args.seed)
            texts += model_prompts(model, tokenizer, n_model, args.batch_size, decode_fn=decode_fn, exclude=dev,
                                   s=replace(USER_TURN_SAMPLING, temperature=args.prompt_temperature))
        if check_no_dev_overlap(texts, dev_path):
            print(f"checked: no prompt equals one of {dev_path}")
        else:
            print("warning: no evaluation prompt file found, the overlap check was skipped", file=sys.stderr)
        random.Random(args.seed).shuffle(texts)  # built and model-written mixed all through, for --time_limit
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": x}], add_generation_prompt=True)
                   for x in texts]
        s = replace(DISTILL_SAMPLING, temperature=args.temperature)
        data = distill(model, prompts, args.max_new_tokens, args.batch_size, tokenizer.eos_ids, s, decode_fn,
                       time_limit=args.time_limit)
        data["meta"] = dict(base=base, vocab_size=model.config.vocab_size, max_new_tokens=args.max_new_tokens,
                            sampling=asdict(s), seed=args.seed, num_prompts=len(data["prompt_lens"]),
                            prompt_source=args.prompt_source,
                            prompt_temperature=args.prompt_temperature if n_model else None)
        torch.save(data, args.out)
        n = len(data["ids"]) - int(data["prompt_lens"].sum())
        print(f"wrote {args.out}: {len(data['prompt_lens'])} samples, {n:,} response tokens")
        return

    V = model.config.vocab_size
    made_by = data.get("meta", {}).get("base")
    if made_by not in (None, base):
        print(f"warning: {args.data} was distilled from {made_by}, not {base}: the head learns another model's text",
              file=sys.stderr)
    if args.vocab:
        v = torch.load(args.vocab, weights_only=True)
        rank, size = v["rank"].long(), int(v["size"])
    else:
        rank, size = token_ranking(data, V), parse_size(args.draft_vocab, V)
    cov = coverage(data, rank, [size]) if size else {V: 1.0}
    print(f"draft vocabulary: {size or V} ids, covering {next(iter(cov.values())):.4f} of response tokens")
    head = new_head(model, warm_start=args.warm_start)
    if args.init:
        head.load_state_dict({n: t.float() for n, t in read_head(args.init, model)["state_dict"].items()})
        print(f"starting from {args.init}")
    out = Path(args.out) if args.out else checkpoint.parent / MTP_HEAD_FILE
    resume_file = out.with_name(out.name + ".resume")
    run = {n: getattr(args, n) for n in ("data", "k", "steps", "batch_size", "lr", "warmup", "draft_vocab", "vocab",
                                         "targets", "val_frac", "seed", "init")}  # what a resumed run must repeat
    state = {}
    if args.resume:
        if not resume_file.is_file():
            raise FileNotFoundError(f"no {resume_file} to resume; start the run without --resume")
        saved = torch.load(resume_file, map_location=device, weights_only=True)
        diff = [f"--{n} {saved['run'].get(n)} (now {run[n]})" for n in run if saved["run"].get(n) != run[n]]
        if diff:
            raise ValueError(f"{resume_file} was started with other settings: {', '.join(diff)}; repeat them")
        head.load_state_dict(saved["head"])
        state = saved["state"]
    _, evals = train_head(model, head, data, k=args.k, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          warmup=args.warmup, vocab_ids=rank[:size] if size else None, targets=args.targets,
                          val_frac=args.val_frac, eval_every=args.eval_every, seed=args.seed, state=state,
                          time_limit=args.time_limit)
    heldout = dict(heldout_agreement=evals[-1][1], heldout_est_accepted_length=evals[-1][2]) if evals else {}
    save_head(out, head, base=base, k=args.k, vocab_rank=rank, draft_vocab=size, targets=args.targets,
              steps=state["step"], data_tokens=len(data["ids"]),
              prompt_source=data.get("meta", {}).get("prompt_source", "built"), init=args.init, **heldout)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) after {state['step']} of {args.steps} steps")
    if state["step"] < args.steps:
        torch.save({"run": run, "head": head.state_dict(), "state": state}, resume_file)
        print(f"wrote {resume_file}; continue with the same command plus --resume")
    elif resume_file.is_file():
        resume_file.unlink()


def cli():
    """main() with a user mistake reported as one line (also what `python mtp.py ...` runs)."""
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
