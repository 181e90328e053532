"""Multi-token prediction (FastMTP-style): one small module drafts K tokens from the target's own hidden state.

    python mtp.py distill --out mtp_data.pt --num_prompts 8192 --max_new_tokens 256 --batch_size 512
    python mtp.py vocab --data mtp_data.pt --size 16384 --out vocab.pt         # coverage of each size, printed
    python mtp.py train --data mtp_data.pt --k 3 --steps 3000 --batch_size 32  # -> <checkpoint dir>/mtp_head.pth
    python generate.py --mtp --speculate_k 3 --temperature 0                   # drafts with the shipped head

The head is DeepSeek-V3's MTP module used FastMTP's way: ONE module applied K times. Step 1 at position t reads
(h_t, emb(x_{t+1})) -- h_t the target's final-normed hidden state, which predicted x_{t+1} -- and predicts x_{t+2}:
    u = eh_proj(cat([hnorm(h), enorm(emb)]))     hidden first (MiMo's order; DeepSeek-V3's weights put emb first)
    y = block(u)                                  one decoder layer of the model's own kind, with its own KV cache
    logits = output(norm(y))                      embedding and output head are the frozen target's, not stored
Step k > 1 runs at the next position on (y of step k-1, emb(token step k-1 drafted)): y is the block output before
the final norm, as DeepSeek-V3 feeds its next depth (hnorm normalizes it anyway).

One KV cache, indexed by position, as vLLM/SGLang draft with MTP layers: slot j holds the step-1 entry of (h_j,
x_{j+1}) for every accepted position, and while drafting, slots t+1..t+K-1 hold steps 2..K of the current round
(overwritten by the next round, hidden by the mask until then). Training reproduces exactly what drafting sees
(`teacher_forced_logits`): a step-k query attends to step-1 entries up to its anchor t, plus steps 2..k of that same
anchor; RoPE position t+k-1. So train and draft compute the same numbers, which tests/test_mtp.py checks.

Training (self-distillation, the loss, the compressed vocabulary) lives in mtp_train.py; `python mtp.py distill|vocab|
train` runs its command line, so the commands above work from here.
"""
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from generate import Sampling, sample
from model import (KVCache, Linear, ModelArgs, RMSNorm, Transformer, TransformerBlock, cache_window, linear,
                   rope_tables, tree_inputs)
from spec_tree import DraftTree, parse_tree

MTP_HEAD_FILE = "mtp_head.pth"  # beside model.pth; `generate.py --mtp` loads it for the embedded default
LOSS_DECAY = 0.6  # alpha_k proportional to 0.6^(k-1), FastMTP's weighting


# ------------------------------------------------------------------------------------------------------------ the head
class MTPHead(nn.Module):
    """hnorm, enorm, eh_proj, one TransformerBlock, norm. `share(model, n)` attaches the target's output rows."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.hnorm = RMSNorm(config.dim, config.norm_eps)
        self.enorm = RMSNorm(config.dim, config.norm_eps)
        self.eh_proj = Linear(2 * config.dim, config.dim, bias=False)
        self.block = TransformerBlock(config)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.max_seq_length = -1
        self.vocab_size = config.vocab_size
        self.vocab_ids: Optional[torch.Tensor] = None  # (N,) full ids of the draft vocabulary; None = all

    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype=None):
        c, device = self.config, self.norm.weight.device
        self.max_seq_length = max_seq_length
        self.block.attention.kv_cache = KVCache(max_batch_size, max_seq_length, c.n_local_heads, c.head_dim,
                                                dtype or self.norm.weight.dtype).to(device)
        cos, sin = rope_tables(max_seq_length, c.head_dim, c.rope_base, c.rope_scaling, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def share(self, model: Transformer, vocab_ids: Optional[torch.Tensor] = None):
        """Draft over the target's output rows `vocab_ids` (all when None). The rows are gathered once here, so
        a draft step reads N contiguous rows instead of gathering them again."""
        w = output_weight(model)
        self.vocab_size = w.shape[0]
        self.vocab_ids = None if vocab_ids is None else vocab_ids.to(w.device, torch.long)
        self.register_buffer("draft_weight", w.detach() if vocab_ids is None else w[self.vocab_ids], persistent=False)
        return self

    def fuse(self, hidden, emb):
        # (B, S, D) twice -> (B, S, 2D) -> (B, S, D); hidden first
        return self.eh_proj(torch.cat([self.hnorm(hidden), self.enorm(emb)], dim=-1))

    def forward(self, hidden, emb, input_pos, tree=None):
        """hidden, emb (B, S, D) written to cache slots input_pos (S,) -> block output (B, S, D), before the norm.
        `tree`: the S entries are nodes of a draft tree, as for Transformer.forward (model.tree_inputs)."""
        x = self.fuse(hidden, emb)
        slots = torch.arange(cache_window(input_pos, self.max_seq_length), device=x.device)
        mask = slots[None, :] <= input_pos[:, None]  # (S, n): causal over the cache slots attended to
        pos = input_pos[None]  # (1, S)
        if tree is not None:
            mask, pos = tree_inputs(slots, *tree)
        return self.block(x, (self.rope_cos, self.rope_sin, pos), mask, input_pos)  # tables, rows: model.apply_rope

    def logits(self, y):
        return linear(self.norm(y), self.draft_weight)  # (..., N)

    def top(self, y, b: int):
        """y (B, S, D) -> the b most likely tokens after each entry (B, S, b), full-vocabulary ids."""
        top = self.logits(y).topk(b, dim=-1).indices
        return top if self.vocab_ids is None else self.vocab_ids[top]

    def sample(self, y, s: Sampling):
        """y (B, D) -> drafted full-vocabulary id (B,) and its distribution over the FULL vocabulary (B, V), zero
        outside the draft list, so the target's accept/reject is the same as for any other drafter."""
        token, q = sample(self.logits(y), s)  # (B,), (B, N)
        if self.vocab_ids is None:
            return token, q
        full = torch.zeros(q.shape[0], self.vocab_size, dtype=q.dtype, device=q.device)
        return self.vocab_ids[token], full.scatter_(1, self.vocab_ids.expand(q.shape[0], -1), q)


def output_weight(model: Transformer) -> torch.Tensor:
    """The target's output matrix (V, D) in floating point; a quantized untied output cannot be sliced."""
    w = getattr(model.output, "weight", None)
    if w is not None and w.is_floating_point():
        return w
    if model.config.tie_embeddings:
        return model.tok_embeddings.weight
    raise ValueError("the model's output layer is quantized, so the MTP head cannot share it; quantize without "
                     "the output layer, or use the float checkpoint")


def loss_weights(k: int) -> list:
    w = [LOSS_DECAY ** i for i in range(k)]
    return [x / sum(w) for x in w]


# --------------------------------------------------------------------------------------------------------- checkpoint
def new_head(model: Transformer, warm_start: bool = False) -> MTPHead:
    """A head for `model` on its device; warm_start copies its last layer into the block and its final norm."""
    head = MTPHead(model.config).to(model.norm.weight.device)
    if warm_start:
        head.block.load_state_dict({k: v.float() for k, v in model.layers[-1].state_dict().items()})
        head.norm.weight.data.copy_(model.norm.weight.float())
    return head


def head_checkpoint(state: dict, config: ModelArgs, base: str, k: int, vocab_rank=None, draft_vocab: int = 0,
                    dtype=torch.bfloat16, **info) -> dict:
    """What mtp_head.pth holds: the head's weights, a plain config, and the corpus token ranking (most frequent
    first) whose first `draft_vocab` ids form the draft vocabulary (0: the full vocabulary)."""
    meta = dict(base=base, dim=config.dim, k=k, draft_vocab=int(draft_vocab), model_args=asdict(config), **info)
    state = {n: t.detach().to("cpu", dtype) for n, t in state.items()}
    rank = None if vocab_rank is None else torch.as_tensor(vocab_rank).to(torch.int32).cpu()
    return {"config": meta, "state_dict": state, "vocab_rank": rank}


def save_head(path, head: MTPHead, **kw) -> dict:
    ckpt = head_checkpoint(head.state_dict(), head.config, **kw)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return ckpt


def read_head(path, model: Transformer) -> dict:
    """An MTP head checkpoint's contents (on the CPU, as saved), refused in one line if it is missing, not a head,
    or made for a model of other shapes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MTP head {path} not found; train one with `python mtp.py train` "
                                f"(README.md, MTP head) or pass --mtp_checkpoint_path")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        config, mine = ckpt["config"], ckpt["config"]["model_args"]
        if "state_dict" not in ckpt:
            raise KeyError("state_dict")
        ckpt.setdefault("vocab_rank", None)
    except Exception as e:
        raise ValueError(f"{path} is not an MTP head checkpoint ({type(e).__name__}); make it with "
                         f"`python mtp.py train`") from None
    theirs = asdict(model.config)
    diff = [f for f in ("dim", "vocab_size", "n_head", "n_local_heads", "head_dim", "intermediate_size")
            if mine[f] != theirs[f]]
    if diff:
        ours, model_has = (", ".join(f"{f}={d[f]}" for f in diff) for d in (mine, theirs))
        raise ValueError(f"MTP head {path} was made for {config.get('base')} ({ours}), not this model ({model_has}); "
                         f"use the head trained for it")
    return ckpt


def load_head(path, model: Transformer, draft_vocab: Optional[int] = None) -> MTPHead:
    """The head in `path`, on the model's device and dtype, sharing its output rows. draft_vocab: how many of the
    ranked ids to draft over (None: what it was trained with; 0: all)."""
    ckpt = read_head(path, model)
    config, state, rank = ckpt["config"], ckpt["state_dict"], ckpt["vocab_rank"]
    args = ModelArgs(**config["model_args"])
    head = MTPHead(args)
    head.load_state_dict(state)
    w = output_weight(model)
    head = head.to(w.device, model.norm.weight.dtype).eval()
    if w.is_cuda:  # the target's decode kernels: Triton GEMVs and decode attention
        from decode_attention import use_decode_attention
        from gemv import use_gemv
        use_gemv(use_decode_attention(head))
    n = config.get("draft_vocab", 0) if draft_vocab is None else draft_vocab
    if n and rank is None:
        raise ValueError(f"{path} has no vocabulary ranking, so --draft_vocab {n} cannot pick rows; use 0 (full)")
    if n and not 0 < n <= len(rank):
        raise ValueError(f"--draft_vocab {n} is out of range: {path} ranks {len(rank)} tokens; use 1..{len(rank)} "
                         f"or 0 for the full vocabulary")
    head.k = config.get("k", 1)
    return head.share(model, rank[:n].long() if n else None)


# ---------------------------------------------------------------------------------------------------------- drafting
def draft(head: MTPHead, model: Transformer, hidden, tokens, input_pos, last, k: int, s: Sampling):
    """Catch up, then draft k tokens. hidden (B, S, D): target states at slots input_pos (S,); tokens (B, S): the
    token each of them predicted. Entry `last` (a (1,) tensor) is the newest accepted one: slots after it get
    garbage (a fixed shape compiles to one graph) that drafting overwrites before any query can see it.
    -> drafts (B, k) of full ids, their distributions (B, k, V)."""
    y = head(hidden, model.tok_embeddings(tokens), input_pos).index_select(1, last)  # (B, 1, D)
    pos = input_pos.index_select(0, last)  # (1,)
    drafts, probs = [], []
    for i in range(k):
        token, q = head.sample(y[:, -1], s)
        drafts.append(token)
        probs.append(q)
        if i + 1 < k:
            pos = pos + 1
            y = head(y, model.tok_embeddings(token[:, None]), pos)
    return torch.stack(drafts, 1), torch.stack(probs, 1)


def draft_tree(head: MTPHead, model: Transformer, hidden, tokens, input_pos, last, tree: DraftTree):
    """Catch up as `draft` does, then grow the tree (spec_tree.py) one depth a head forward: the head's top b_d tokens
    after every node of depth d-1. Node j of the tree goes to the head's cache slot root + j (root: the slot of
    entry `last`), where the next catch-up writes over it. -> the tree's nodes past the root (B, N-1), level order."""
    y = head(hidden, model.tok_embeddings(tokens), input_pos).index_select(1, last)  # (B, 1, D): the root's output
    root = input_pos.index_select(0, last)  # (1,)
    depth, visible = tree.tensors(hidden.device)
    levels = []
    for d, b in enumerate(tree.branching, 1):
        top = head.top(y, b).flatten(1)  # (B, w_d): the children of depth d-1's nodes, each parent's together
        levels.append(top)
        if d < tree.depth:
            nodes = torch.tensor(list(tree.level(d)), device=hidden.device)
            y = head(y.repeat_interleave(b, 1), model.tok_embeddings(top), root + nodes,
                     tree=(root, depth[nodes], visible[nodes]))
    return torch.cat(levels, 1)


class MTPDrafter:
    """generate.py's drafter interface (setup / prefill / propose) over an MTP head and the target itself.

    propose catches the head up on the verify's k+1 positions, each target state with the token it predicted
    (x[0, j+1] for the n accepted drafts, then the target's own `token`); the states past n pair with rejected
    drafts, which the k draft steps overwrite before any query sees them. The step-1 output at position n starts
    the k drafts. One shape whatever n is, so the proposal traces into the target's step.
    """

    def __init__(self, head: MTPHead, target: Transformer, step=draft, tree: Optional[DraftTree] = None):
        self.head, self.target, self.step = head, target, step  # the target itself: its embedding and output rows
        self.tree = tree  # a DraftTree: generate.spec_step verifies a tree that propose_tree drafts

    def setup(self, max_seq_length: int):
        if self.head.max_seq_length != max_seq_length:
            self.head.setup_caches(1, max_seq_length)

    def prefill(self, prompt, hidden):
        T = prompt.shape[1]
        if T > 1:  # the last prompt position pairs with a token not sampled yet: it comes with the first propose
            self.head(hidden[:, :T - 1], self.target.tok_embeddings(prompt[:, 1:]),
                      torch.arange(T - 1, device=prompt.device))

    def propose(self, x, n, token, hidden, input_pos, k: int, s: Sampling):
        drafts, q = self.step(self.head, self.target, hidden, predicted(x, n, token), input_pos, n.view(1), k, s)
        return drafts[0], q[0]  # (k,), (k, V)

    def propose_tree(self, x, n, token, hidden, input_pos):
        """The same state -> the tree's nodes after `token` (N-1,), level order; no distributions (spec_tree.py)."""
        return draft_tree(self.head, self.target, hidden, predicted(x, n, token), input_pos, n.view(1), self.tree)[0]


def predicted(x, n, token):
    """The token each of the verify's k+1 states predicted: x[0, j+1] for the accepted drafts, `token` at n, and
    rejected drafts past it (garbage the drafting overwrites) -> (1, k+1)."""
    k = x.shape[1] - 1
    out = torch.cat([x[0, 1:], token.view(1)])
    return torch.where(torch.arange(k + 1, device=x.device) == n, token, out).view(1, k + 1)


def load_speculation(args, model: Transformer, target_dir, device: str):
    """generate.py's Speculation for --mtp / --mtp_checkpoint_path: this head drafts, the target verifies with
    the same (compiled with --compile) prefill and step as for a draft model."""
    from generate import Speculation, compile_spec_steps, prefill_hidden, spec_step
    if args.draft_checkpoint_path:
        raise ValueError("--draft_checkpoint_path and --mtp/--mtp_checkpoint_path both name a drafter; choose one")
    path = Path(args.mtp_checkpoint_path) if args.mtp_checkpoint_path else Path(target_dir) / MTP_HEAD_FILE
    t = time.perf_counter()
    head = load_head(path, model, args.draft_vocab)
    tree = parse_tree(args.draft_tree) if getattr(args, "draft_tree", None) else None
    k = tree.depth if tree else head.k if args.speculate_k is None else args.speculate_k
    steps = compile_spec_steps(device, args.compile_prefill) if args.compile else (prefill_hidden, spec_step)
    n = head.vocab_size if head.vocab_ids is None else len(head.vocab_ids)
    spec = Speculation(MTPDrafter(head, model, tree=tree), k, *steps)
    print(f"loaded MTP head {path} in {time.perf_counter() - t:.1f} s (trained for k={head.k}, drafting over {n} "
          f"of {head.vocab_size} tokens), speculating {spec.describe()}", file=sys.stderr)
    return spec


# ------------------------------------------------------------------------------------------------ native MTP weights
# Two published layouts of one MTP layer, each mapped exactly onto MTPHead (block keys are Llama/Qwen2 style):
#   MiMo-7B   model.mtp_layers.{i}.{token_layernorm, hidden_layernorm, input_proj, final_layernorm} + the block's
#             self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm directly
#             under model.mtp_layers.{i}. input_proj reads cat([hidden_layernorm(h), token_layernorm(emb)]):
#             hidden first, our order, copied as is. final_layernorm is applied before lm_head: our norm.
#   DeepSeek-V3  model.layers.{n_layer + i}.{enorm, hnorm, eh_proj, shared_head.norm} + the block under the same
#             prefix; embed_tokens and shared_head.head there are copies of the target's (shared, dropped).
#             eh_proj reads cat([enorm(emb), hnorm(h)]) -- embedding FIRST, unlike the paper's notation (vLLM's
#             deepseek_mtp.py, SGLang's deepseek_nextn.py, Megatron agree) -- so its two column halves are swapped.
#             DeepSeek-V3's own MLA attention and MoE block are not model.py blocks and are refused.
# Both reference implementations zero the embedding at position 0; we do not (it only touches the first anchor).
NATIVE_NAMES = {
    "mimo": {"hnorm": "hidden_layernorm", "enorm": "token_layernorm", "eh_proj": "input_proj",
             "norm": "final_layernorm"},
    "deepseek": {"hnorm": "hnorm", "enorm": "enorm", "eh_proj": "eh_proj", "norm": "shared_head.norm"},
}
BLOCK_NAMES = {"attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
               "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm"}
SHARED_NAMES = ("embed_tokens.weight", "shared_head.head.weight")


def native_prefix(style: str, config: ModelArgs, index: int = 0) -> str:
    return f"model.mtp_layers.{index}." if style == "mimo" else f"model.layers.{config.n_layer + index}."


def _swap_halves(w):
    d = w.shape[1] // 2
    return torch.cat([w[:, d:], w[:, :d]], dim=1)


def head_state_from_native(source, config: ModelArgs, style: str, index: int = 0) -> dict:
    """An MTPHead state dict from one native MTP layer. `source` has keys() and get(key) -> tensor: a dict, or
    convert_hf_checkpoint's lazy HFSource (only this layer's tensors are read)."""
    pre, names, keys = native_prefix(style, config, index), NATIVE_NAMES[style], set(source.keys())
    if any(k.startswith(pre + "self_attn.q_a_proj") or k.startswith(pre + "mlp.experts.") for k in keys):
        raise ValueError(f"{pre}* uses MLA attention or a mixture of experts; model.py has neither, so this MTP "
                         f"layer cannot be converted")

    def get(name):
        if pre + name not in keys:
            raise ValueError(f"native MTP layer is missing {pre + name}; is it a complete {style} checkpoint?")
        return source.get(pre + name)

    out = {f"{ours}.weight": get(f"{theirs}.weight") for ours, theirs in names.items()}
    if style == "deepseek":
        out["eh_proj.weight"] = _swap_halves(out["eh_proj.weight"])
    out["block.attention.wqkv.weight"] = torch.cat([get(f"self_attn.{x}_proj.weight") for x in "qkv"])
    if config.attention_bias:
        out["block.attention.wqkv.bias"] = torch.cat([get(f"self_attn.{x}_proj.bias") for x in "qkv"])
    for ours, theirs in BLOCK_NAMES.items():
        out[f"block.{ours}.weight"] = get(f"{theirs}.weight")
    with torch.device("meta"):
        expected = {n: tuple(t.shape) for n, t in MTPHead(config).state_dict().items()}
    for n, shape in expected.items():
        if tuple(out[n].shape) != shape:
            raise ValueError(f"native MTP weight for {n} has shape {tuple(out[n].shape)}, the config says {shape}")
    known = {pre + f"{t}.weight" for t in names.values()} | {pre + f"{t}.weight" for t in BLOCK_NAMES.values()}
    known |= {pre + f"self_attn.{x}_proj.{p}" for x in "qkv" for p in ("weight", "bias")}
    known |= {pre + s for s in SHARED_NAMES}
    left = sorted(k for k in keys if k.startswith(pre) and k not in known and "rotary_emb" not in k)
    if left:
        raise ValueError(f"native MTP layer has keys this module does not know: {left[:3]}")
    return out


def head_state_to_native(state: dict, config: ModelArgs, style: str, index: int = 0) -> dict:
    """The inverse of head_state_from_native (shared embedding/output copies not included)."""
    pre, names = native_prefix(style, config, index), NATIVE_NAMES[style]
    out = {pre + f"{theirs}.weight": state[f"{ours}.weight"] for ours, theirs in names.items()}
    if style == "deepseek":
        out[pre + "eh_proj.weight"] = _swap_halves(state["eh_proj.weight"])
    sizes = [config.n_head * config.head_dim] + 2 * [config.n_local_heads * config.head_dim]
    for x, w in zip("qkv", state["block.attention.wqkv.weight"].split(sizes)):
        out[pre + f"self_attn.{x}_proj.weight"] = w
    if config.attention_bias:
        for x, b in zip("qkv", state["block.attention.wqkv.bias"].split(sizes)):
            out[pre + f"self_attn.{x}_proj.bias"] = b
    for ours, theirs in BLOCK_NAMES.items():
        out[pre + f"{theirs}.weight"] = state[f"block.{ours}.weight"]
    return out


def native_style(keys, config: ModelArgs) -> Optional[str]:
    keys = set(keys)
    if native_prefix("mimo", config) + "input_proj.weight" in keys:
        return "mimo"
    if native_prefix("deepseek", config) + "eh_proj.weight" in keys:
        return "deepseek"
    return None


def native_mtp_keys(keys, config: ModelArgs) -> set:
    """Every key of every native MTP layer (only the first is converted): what the main model's conversion must
    treat as neither missing nor left over."""
    return {k for k in keys if k.startswith("model.mtp_layers.") or (
        k.startswith("model.layers.") and k.split(".")[2].isdigit() and int(k.split(".")[2]) >= config.n_layer)}


def native_head_checkpoint(source, config: ModelArgs, base: str = "") -> Optional[dict]:
    """For convert_hf_checkpoint.py: an mtp_head.pth checkpoint of the source's first native MTP layer, or None
    when it has none. `source` has keys() and get(key). Save it with torch.save(ckpt, out / mtp.MTP_HEAD_FILE)."""
    style = native_style(source.keys(), config)
    if style is None:
        return None
    state = head_state_from_native(source, config, style)
    n_mtp = len({k.split(".")[2] for k in native_mtp_keys(source.keys(), config)})
    return head_checkpoint(state, config, base=base, k=1, dtype=state["eh_proj.weight"].dtype, source=style,
                           native_mtp_layers=n_mtp)


def pop_native_mtp(sd: dict, config: ModelArgs, base: str = "") -> Optional[dict]:
    """native_head_checkpoint for a plain state dict, which also loses every native MTP key."""
    ckpt = native_head_checkpoint(sd, config, base)
    for k in native_mtp_keys(sd.keys(), config):
        del sd[k]
    return ckpt


if __name__ == "__main__":
    from mtp_train import cli
    cli()
