"""model.py on tiny random models: cache paths agree with a plain forward, presets resolve unambiguously."""
import pytest
import torch

from model import ModelArgs, Transformer, transformer_configs


def tiny(**kw):
    args = dict(block_size=128, vocab_size=97, n_layer=2, n_head=4, dim=32, intermediate_size=48, n_local_heads=2)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**{**args, **kw}))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kw", [{}, {"num_experts": 4, "num_activated_experts": 2}, {"attention_bias": True},
                                {"tie_embeddings": True}])
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
@torch.no_grad()
def test_incremental_decode_equals_full_forward(kw, dtype, bound):
    """Prefill, one-token decode and a multi-token step through the cache give a plain float32 forward's logits;
    in half precision (--dtype on the CPU; README suggests float16 for eager speed there) up to its rounding."""
    torch.manual_seed(1)
    x = torch.randint(0, 97, (2, 40))
    full = tiny(**kw)(x)
    model = tiny(**kw).to(dtype)
    model.setup_caches(2, 64)
    steps = [model(x[:, :25], torch.arange(25))]
    steps += [model(x[:, t:t + 1], torch.tensor([t])) for t in range(25, 32)]
    steps.append(model(x[:, 32:], torch.arange(32, 40)))  # a multi-token step, as speculative verification does
    out = torch.cat(steps, 1)
    assert out.dtype == dtype and rel(out.float(), full) < bound


@torch.no_grad()
def test_stale_cache_slots_are_invisible():
    """Writing garbage past the current position (a rejected speculation) must not change later results."""
    model = tiny()
    x = torch.randint(0, 97, (1, 20))
    model.setup_caches(1, 32)
    model(x[:, :10], torch.arange(10))
    model(torch.randint(0, 97, (1, 6)), torch.arange(10, 16))  # rejected draft
    again = model(x[:, 10:20], torch.arange(10, 20))
    assert rel(again, tiny()(x)[:, 10:]) < 1e-5


@torch.no_grad()
def test_cpu_steps_read_only_the_cache_slots_in_use():
    """On the CPU a step attends to the slots up to its furthest position, not the whole cache (model.cache_window):
    NaN in every slot beyond leaves it equal to a plain forward. Masked but read, they would turn it into NaN."""
    model = tiny()
    x = torch.randint(0, 97, (1, 13))
    model.setup_caches(1, 128)
    model(x[:, :10], torch.arange(10))
    for layer in model.layers:
        layer.attention.kv_cache.k_cache[:, :, 10:] = float("nan")
        layer.attention.kv_cache.v_cache[:, :, 10:] = float("nan")
    out = torch.cat([model(x[:, 10:11], torch.tensor([10])), model(x[:, 11:13], torch.arange(11, 13))], 1)
    assert rel(out, tiny()(x)[:, 10:]) < 1e-5


@torch.no_grad()
def test_left_padded_rows_equal_their_own_runs():
    model = tiny()
    a, b = torch.randint(0, 97, (1, 12)), torch.randint(0, 97, (1, 7))
    model.setup_caches(2, 16)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    out = model(batch, torch.arange(12), left_pad=torch.tensor([0, 5]))
    assert rel(out[0], tiny()(a)[0]) < 1e-5
    assert rel(out[1, 5:], tiny()(b)[0]) < 1e-5


@torch.no_grad()
def test_moe_decode_and_prefill_paths_agree():
    model = tiny(num_experts=4, num_activated_experts=2)
    ff = model.layers[0].feed_forward
    x = torch.randn(40, 32)
    dense = ff(x)  # 40 tokens: the all-experts path
    gathered = torch.cat([ff(x[i:i + 8]) for i in range(0, 40, 8)])  # 8 tokens: the gather path
    assert rel(gathered, dense) < 1e-5


def test_presets_resolve_unambiguously():
    for name in transformer_configs:
        assert ModelArgs.from_name(name) == ModelArgs(**transformer_configs[name])
    assert ModelArgs.from_name("Meta-Llama-3.1-8B-Instruct").rope_scaling is not None
    assert ModelArgs.from_name("CodeLlama-7b-Python-hf").vocab_size == 32016
    assert ModelArgs.from_name("Qwen2.5-0.5B-Instruct").attention_bias
    assert ModelArgs.from_name("SmolLM2-135M-Instruct").tie_embeddings
    assert ModelArgs.from_name("llama-2-7b-chat-hf").dim == 4096


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ValueError, match="matches no preset"):
        ModelArgs.from_name("gpt-neox-20b")


def test_cache_longer_than_context_is_a_clear_error():
    with pytest.raises(ValueError, match="exceeds the model's context"):
        tiny().setup_caches(1, 1000)


def test_config_json_round_trip(tmp_path):
    args = ModelArgs.from_name("Llama-3.2-1B")
    args.to_json(tmp_path / "config.json")
    assert ModelArgs.from_json(tmp_path / "config.json") == args


def test_cpu_linear_is_f_linear(monkeypatch):
    """model.linear sends float32 CPU matmuls outside autograd through oneDNN (on CPUs where MKL is the slower; here
    on any CPU whose build has oneDNN): it must give F.linear's result up to float32 rounding at decode, verify and
    prefill shapes, with a bias and with a strided weight, and under autograd take F.linear's path, whose gradient
    it must then carry."""
    import torch.nn.functional as F
    import model
    from model import linear

    monkeypatch.setattr(model, "ONEDNN_FASTER", model.ONEDNN)

    torch.manual_seed(0)
    w, b = torch.randn(96, 64), torch.randn(96)
    for x in (torch.randn(1, 1, 64), torch.randn(1, 4, 64), torch.randn(2, 33, 64)):
        for weight, bias in ((w, None), (w, b), (torch.randn(96, 128)[:, ::2], b)):
            with torch.no_grad():
                torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    if model.ONEDNN:  # the fast path is the one taken outside autograd (this CPU build has oneDNN)
        with torch.no_grad(), torch.profiler.profile() as prof:
            linear(torch.randn(1, 64), w)
        assert "mkldnn::_linear_pointwise" in {e.name for e in prof.events()}
    x = torch.randn(3, 64)
    linear(x, w.requires_grad_(True)).sum().backward()
    torch.testing.assert_close(w.grad, x.sum(0).expand(96, 64))

