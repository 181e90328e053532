"""The generation loop on tiny random models: sampling, batching, compiled step, loading, errors."""
import re

import pytest
import torch

from generate import Sampling, decode_one_token, generate, load_model, logits_to_probs, prefill
from conftest import TINY, tiny
from model import ModelArgs


def test_sampling_matches_transformers_warpers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    torch.manual_seed(0)
    logits = torch.randn(4, 101) * 3
    for s in [Sampling(0.7, None, 1.0), Sampling(1.3, 10, 1.0), Sampling(0.8, None, 0.9), Sampling(0.6, 20, 0.95),
              Sampling(1.0, 5, 0.5), Sampling(0.9, 50, 0.99)]:  # top-p inside top-k: only the k are ranked
        ref = TemperatureLogitsWarper(s.temperature)(None, logits.clone())
        if s.top_k:
            ref = TopKLogitsWarper(s.top_k)(None, ref)
        if s.top_p < 1:
            ref = TopPLogitsWarper(s.top_p)(None, ref)
        torch.testing.assert_close(logits_to_probs(logits, s), ref.softmax(-1), atol=1e-6, rtol=1e-5)
    greedy = logits_to_probs(logits, Sampling(0.0))
    assert torch.equal(greedy.argmax(-1), logits.argmax(-1)) and torch.equal(greedy.sum(-1), torch.ones(4))


def test_sampled_tokens_follow_the_distribution():
    from generate import sample_from
    torch.manual_seed(0)
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])
    draws = sample_from(probs.expand(200_000, 5).contiguous())
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert (freq - probs).abs().max() < 0.005 and freq[4] == 0


@torch.no_grad()
def test_batch_rows_equal_batch_one_runs():
    model = tiny()
    prompts = [[5, 9, 2, 77, 31, 8, 14, 3], [42, 7], [1, 2, 3, 4, 5]]
    together = generate(model, prompts, 12)
    alone = [generate(model, [p], 12)[0] for p in prompts]
    assert together == alone


@torch.no_grad()
def test_greedy_generation_equals_argmax_of_full_forward():
    model = tiny()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    out = generate(model, [prompt], 10)[0]
    seq = list(prompt)
    for _ in range(10):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[len(prompt):]


@torch.no_grad()
def test_generation_stops_at_stop_ids():
    model = tiny()
    out = generate(model, [[3, 1, 4]], 30)[0]
    stop = out[4]
    stopped = generate(model, [[3, 1, 4]], 30, stop_ids={stop})[0]
    assert stopped == out[:out.index(stop) + 1]


@pytest.mark.parametrize("depth", [1, 2])
@torch.no_grad()
def test_queuing_steps_ahead_changes_no_token(depth, monkeypatch):
    """The GPU loops read each step's tokens only after queuing `depth` more; on the CPU they run depth 0. With
    depth forced here, plain and speculative decoding stream and return what depth 0 does: batches with a row
    that stops early, a stop in the first token, every max_new_tokens edge, greedy and sampled."""
    import generate as gen
    from test_speculative import perturbed
    target = tiny(3)
    drafter = gen.ModelDrafter(perturbed(target, 0.05, 1))
    prompts = [[5, 9, 2], [7, 1, 4, 4, 3]]
    first = generate(target, prompts, 12)
    stops = [(), {first[0][4]}, {first[1][0]}, {first[0][0], first[1][6]}]

    def runs():
        out = []
        for stop in stops:
            for n in (1, 2, 12):
                streamed = []
                out.append((generate(target, prompts, n, stop_ids=stop, callback=lambda t: streamed.append(t.tolist())),
                            streamed))
                for s in (Sampling(), Sampling(temperature=1.0)):
                    torch.manual_seed(0)
                    out.append(gen.speculative_generate(target, drafter, prompts[1:], n, s, 3, stop_ids=stop,
                                                        max_seq_length=64))
        return out

    want = runs()
    monkeypatch.setattr(gen, "QUEUE_DEPTH", depth)
    monkeypatch.setattr(gen, "queue_depth", lambda device: depth)
    assert runs() == want


def int8_tiny():
    import quantize as Q
    model, _ = Q.quantize_model(tiny(), "int8", verbose=False)
    Q.prepare_for_device(model)
    assert model.layers[0].attention.wqkv.unit_scales is not None  # the CPU int8 kernel, not the float fallback
    return model


# int8: the CPU int8 kernel's unit scales, once made inside the graph, failed inductor's lowering (--compile_prefill)
@pytest.mark.parametrize("make", [tiny, int8_tiny], ids=["float", "int8"])
@torch.no_grad()
def test_compiled_decode_equals_eager(make):
    model = make()
    prompts = [[5, 9, 2, 77, 31], [42, 7]]
    eager = generate(model, prompts, 8)
    compiled = torch.compile(decode_one_token, fullgraph=True)
    assert generate(model, prompts, 8, decode_fn=compiled) == eager
    pre = torch.compile(prefill, fullgraph=True, dynamic=True)
    assert generate(model, prompts, 8, prefill_fn=pre, decode_fn=compiled) == eager


def save_tiny(folder, **kw):
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny(**kw)
    model.config.to_json(folder / "config.json")
    sd = {k: v for k, v in model.state_dict().items() if not (model.config.tie_embeddings and k == "output.weight")}
    torch.save(sd, folder / "model.pth")
    return model


@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": True}, {"num_experts": 4}])
@torch.no_grad()
def test_load_model_round_trip(tmp_path, kw):
    ref = save_tiny(tmp_path / "m", **kw)
    model = load_model(tmp_path / "m" / "model.pth")
    x = torch.randint(0, 101, (1, 9))
    assert torch.equal(model(x), ref(x))
    if kw.get("tie_embeddings"):
        assert model.output.weight is model.tok_embeddings.weight


def test_model_bytes_counts_the_embedding_table_only_while_it_is_the_output_head():
    import quantize as Q
    from generate import model_bytes

    def all_bytes(m):  # each tensor once, as a decode step would hold it
        tensors = {t.data_ptr(): t for t in [*m.parameters(), *m.buffers()]}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    untied, tied = tiny(), tiny(tie_embeddings=True)
    table = tied.tok_embeddings.weight.numel() * 4
    assert model_bytes(untied) == all_bytes(untied) - table
    assert model_bytes(tied) == all_bytes(tied)
    quantized, _ = Q.quantize_model(tied, "int8", quantize_output=True, verbose=False)  # the head is no longer the table
    assert model_bytes(quantized) == all_bytes(quantized) - table


def test_prompt_longer_than_cache_is_a_clear_error():
    with pytest.raises(ValueError, match="shorten the prompt or lower --max_new_tokens"):
        generate(tiny(), [list(range(100)) * 2], 100)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert_hf_checkpoint.py"):
        load_model(tmp_path / "nope" / "model.pth")


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    save_tiny(tmp_path / "m")
    (tmp_path / "m" / "model.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_model(tmp_path / "m" / "model.pth")


def test_a_head_or_a_tensor_given_as_the_model_is_a_clear_error(tmp_path):
    """An MTP head file (or any non-state-dict) as --checkpoint_path: one line saying what it is, not a KeyError."""
    save_tiny(tmp_path / "m", tie_embeddings=True)
    torch.save({"config": {}, "state_dict": {}, "vocab_rank": None}, tmp_path / "m" / "model.pth")
    with pytest.raises(ValueError, match="is not a model checkpoint .an MTP head; pass it as --mtp_checkpoint_path"):
        load_model(tmp_path / "m" / "model.pth")
    torch.save(torch.zeros(3), tmp_path / "m" / "model.pth")
    with pytest.raises(ValueError, match="is not a model checkpoint .not a state dict"):
        load_model(tmp_path / "m" / "model.pth")
    torch.save({"norm.weight": torch.zeros(32)}, tmp_path / "m" / "model.pth")
    with pytest.raises(ValueError, match="does not match its config: missing"):  # tied, and no embedding to tie to
        load_model(tmp_path / "m" / "model.pth")
    torch.save({"layers.0.attention.wqkv.weight": torch.zeros(1)}, tmp_path / "m" / "model.pth")
    with pytest.raises(ValueError, match="does not match its config: size mismatch for layers.0.attention.wqkv"):
        load_model(tmp_path / "m" / "model.pth")


def test_checkpoint_not_matching_config_is_a_clear_error(tmp_path):
    save_tiny(tmp_path / "m")
    ModelArgs(**{**TINY, "n_layer": 3}).to_json(tmp_path / "m" / "config.json")
    with pytest.raises(ValueError, match="does not match its config"):
        load_model(tmp_path / "m" / "model.pth")


def test_unknown_model_without_config_is_a_clear_error(tmp_path):
    save_tiny(tmp_path / "mystery-model")
    (tmp_path / "mystery-model" / "config.json").unlink()
    with pytest.raises(ValueError, match="matches no preset"):
        load_model(tmp_path / "mystery-model" / "model.pth")


def test_a_checkpoint_folder_names_the_file_to_pass(tmp_path):
    save_tiny(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="is a folder; pass a checkpoint file in it, e.g. .*m/model.pth"):
        load_model(tmp_path / "m")


def test_a_missing_quantized_copy_names_the_quantize_command(tmp_path):
    save_tiny(tmp_path / "m")
    model = tmp_path / "m" / "model.pth"
    for name, flags in [("model_int8.pth", "--mode int8"), ("model_int4.g64.pth", "--mode int4 --groupsize 64"),
                        ("model_int4-gptq.g128.pth", "--mode int4-gptq --groupsize 128")]:
        command = f"make it with `python quantize.py --checkpoint_path {model} {flags}`"
        with pytest.raises(FileNotFoundError, match=re.escape(command)):
            load_model(tmp_path / "m" / name)
    with pytest.raises(FileNotFoundError, match="convert one with"):  # no model.pth beside it to quantize
        load_model(tmp_path / "other" / "model_int8.pth")


def test_scripts_refuse_bad_flags_before_any_work(capsys):
    """Bad numbers and paths given to the training and evaluation scripts stop them with their own message."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import bench
    import eval_ppl
    import mtp_train
    import spec_eval
    with pytest.raises(ValueError, match="--num_prompts must be at least 1"):
        mtp_train.main(["distill", "--num_prompts", "0"])
    with pytest.raises(ValueError, match="--batch_size must be at least 1"):
        mtp_train.main(["distill", "--batch_size", "0"])
    with pytest.raises(ValueError, match="--steps must be at least 1"):
        mtp_train.main(["train", "--data", "x.pt", "--steps", "0"])
    with pytest.raises(ValueError, match="--lr must be positive, got -1.0"):
        mtp_train.main(["train", "--data", "x.pt", "--lr", "-1"])
    with pytest.raises(FileNotFoundError, match="`python mtp.py vocab --data x.pt --out /nonexistent/v.pt`"):
        mtp_train.main(["train", "--data", "x.pt", "--vocab", "/nonexistent/v.pt"])
    with pytest.raises(ValueError, match="--limit must be at least 1"):
        spec_eval.main(["--mtp", "--limit", "0"])
    with pytest.raises(ValueError, match="--max_new_tokens must be at least 2"):
        spec_eval.main(["--mtp", "--max_new_tokens", "1"])
    with pytest.raises(ValueError, match="--cost_reps must be at least 0"):
        spec_eval.main(["--mtp", "--cost_reps", "-1"])
    with pytest.raises(ValueError, match="matches no preset"):
        bench.main(["--model", "Llama-9B", "--device", "cpu"])
    with pytest.raises(ValueError, match="--model Llama-3.1-405B needs 1623.4 GB of float32 weights and cpu has"):
        bench.main(["--model", "Llama-3.1-405B", "--device", "cpu"])  # refused before any allocation
    with pytest.raises(ValueError, match="--max_new_tokens must be at least 2"):
        bench.main(["--model", "SmolLM2-135M", "--device", "cpu", "--max_new_tokens", "1"])
    with pytest.raises(SystemExit):
        eval_ppl.main(["--checkpoint_path", "/nonexistent/model.pth"])
    assert "checkpoint /nonexistent/model.pth not found" in capsys.readouterr().err
    device = "--device mps: mtp-fast runs on cpu and cuda"  # a device no script can use, on any machine
    for run in (lambda: bench.main(["--model", "SmolLM2-135M", "--device", "mps"]),
                lambda: spec_eval.main(["--mtp", "--device", "mps"]),
                lambda: mtp_train.main(["train", "--data", "x.pt", "--device", "mps"])):
        with pytest.raises(ValueError, match=device):
            run()
    with pytest.raises(SystemExit):
        eval_ppl.main(["--checkpoint_path", "/nonexistent/model.pth", "--max_tokens", "1"])
    assert "--max_tokens 1 leaves nothing to score" in capsys.readouterr().err
    for flags in (["--window", "1", "--stride", "1"], ["--batch_size", "0"]):
        with pytest.raises(SystemExit):
            eval_ppl.main(["--checkpoint_path", "/nonexistent/model.pth", *flags])
        assert "--window must be at least 2 and --batch_size at least 1" in capsys.readouterr().err
    import quantize
    for run in (lambda: eval_ppl.main(["--checkpoint_path", "/nonexistent/model.pth", "--device", "mps"]),
                lambda: quantize.main(["--checkpoint_path", "/nonexistent/model.pth", "--mode", "int4-gptq",
                                       "--device", "mps"])):
        with pytest.raises(SystemExit):
            run()
        assert device in capsys.readouterr().err


def test_a_gpu_index_past_the_machines_is_one_line(monkeypatch):
    import generate as gen
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gen.check_device("cuda:1")
    with pytest.raises(ValueError, match="--device cuda:2: this machine has 2 CUDA GPU.s.; use cuda:0 to cuda:1"):
        gen.check_device("cuda:2")


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature must be 0 (greedy) or positive"),
    (["--top_k", "0"], "--top_k must be at least 1"),
    (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--device", "cdua"], "--device cdua is not a device name; use cpu, cuda or cuda:N"),
    (["--device", "mps"], "--device mps: mtp-fast runs on cpu and cuda"),
])
def test_generate_refuses_bad_numbers_before_loading(flags, message):
    import generate as gen
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        gen.main(["--checkpoint_path", "/nonexistent/model.pth", *flags])  # checked before the missing file


@pytest.mark.parametrize("flags, kernel", [([], "triton"), (["--mtp"], "mma"),
                                           (["--mtp", "--speculate_k", "7"], "mma"),
                                           (["--mtp", "--speculate_k", "8"], "torch"),
                                           (["--draft_checkpoint_path", "d.pth"], "mma"),
                                           (["--draft_checkpoint_path", "d.pth", "--speculate_k", "9"], "torch"),
                                           (["--mtp", "--int4_kernel", "triton"], "triton"),
                                           (["--int4_kernel", "mma"], "mma"),
                                           (["--int4_kernel", "torch"], "torch")])
def test_int4_target_picks_its_kernel_by_the_tokens_a_verify_takes(flags, kernel, monkeypatch):
    """gemv.py's int4 GEMV decodes fastest; its tensor-core kernel over the shuffled layout verifies up to 8 tokens
    fastest, and above that torch's int4 kernel (BENCHMARKS.md): main picks by how many tokens a verify takes,
    unless --int4_kernel names one."""
    import generate as gen

    asked = {}

    def stop(*args, **kwargs):
        asked.update(kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(gen, "load_model", stop)
    with pytest.raises(KeyboardInterrupt):
        gen.main(["--checkpoint_path", "/nonexistent/model.pth", *flags])
    assert asked["int4_kernel"] == kernel


def test_compile_step_for_a_gpu_silences_only_inductors_online_softmax_note():
    """torch 2.11's inductor warns in five lines, asking for a PyTorch issue, when it splits the sampler's wide
    softmax: compile_step hides that note and nothing else (torch.compile is lazy, so no GPU is needed here)."""
    import warnings

    from generate import compile_step
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        compile_step(lambda x: x, "cuda")
        warnings.warn("\nOnline softmax is disabled on the fly since Inductor decides to\nsplit the reduction.")
        warnings.warn("any other warning")
    assert [str(w.message) for w in seen] == ["any other warning"]
