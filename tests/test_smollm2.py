"""End to end on the real SmolLM2-135M-Instruct (float32, CPU): greedy text equals transformers' own."""
import pytest
import torch

from generate import Sampling, generate, load_model, main
from tokenizer import get_tokenizer

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea and explain its imagery."}]


@pytest.fixture(scope="module")
def ours(smollm2_checkpoint):
    return load_model(smollm2_checkpoint / "model.pth"), get_tokenizer(smollm2_checkpoint)


@torch.no_grad()
def test_logits_match_transformers(ours, smollm2_hf):
    model, tok = ours
    ids = torch.tensor([tok.apply_chat_template(MESSAGES)])
    ref = smollm2_hf(ids).logits
    assert ((model(ids) - ref).norm() / ref.norm()).item() < 1e-4


@torch.no_grad()
def test_greedy_64_tokens_equal_transformers(ours, smollm2_hf):
    model, tok = ours
    ids = tok.apply_chat_template(MESSAGES)
    x = torch.tensor([ids])  # the ChatML prompt holds <|im_end|>, which is also the pad id: say nothing is padding
    ref = smollm2_hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=64, do_sample=False,
                              eos_token_id=None, pad_token_id=tok.pad_id)[0, len(ids):].tolist()
    out = generate(model, [ids], 64, Sampling(temperature=0.0))[0]
    assert len(ref) == 64 and out == ref, (tok.decode(out), tok.decode(ref))


@torch.no_grad()
def test_batch_of_distinct_prompts_equals_one_by_one(ours):
    model, tok = ours
    prompts = [tok.encode(t) for t in ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a"]]
    together = generate(model, prompts, 12)
    assert together == [generate(model, [p], 12)[0] for p in prompts]


def test_cli_streams_the_same_text(smollm2_checkpoint, ours, capsys):
    model, tok = ours
    prompt = "The three primary colors are"
    expected = tok.decode(generate(model, [tok.encode(prompt)], 20, Sampling(temperature=0.0))[0])
    main(["--checkpoint_path", str(smollm2_checkpoint / "model.pth"), "--prompt", prompt, "--temperature", "0",
          "--max_new_tokens", "20"])
    out = capsys.readouterr()
    assert expected.strip() in out.out and "tok/s" in out.err and "time to first token" in out.err


def test_cli_compile_runs_an_untimed_first_run(smollm2_checkpoint, capsys, monkeypatch):
    """With --compile, a quiet first run takes the compile time out of the samples' figures, and the seed is set
    again after it: the sampled text equals the one without --compile (compile itself is stubbed out here)."""
    import generate as gen
    monkeypatch.setattr(gen, "compile_steps", lambda device, compile_prefill: (gen.prefill, gen.decode_one_token))
    argv = ["--checkpoint_path", str(smollm2_checkpoint / "model.pth"), "--prompt", "Once upon a time",
            "--temperature", "0.8", "--seed", "3", "--max_new_tokens", "12"]
    main(argv)
    plain = capsys.readouterr()
    main(argv + ["--compile"])
    compiled = capsys.readouterr()
    assert compiled.out == plain.out and plain.out.strip()  # the first run printed nothing
    assert "compiled in" in compiled.err and "compiled in" not in plain.err
    assert compiled.err.count("time to first token") == plain.err.count("time to first token") == 1


def test_cli_chat_keeps_the_conversation(smollm2_checkpoint, ours, capsys, monkeypatch):
    """--chat, two turns and an empty line: each turn re-encodes the whole conversation with the model's template
    (the first turn and its answer are the second prompt's start), and each answer is the model's greedy text.
    With --compile (stubbed out here) a short exchange of its own compiles first, before the first prompt."""
    import builtins

    import generate as gen
    model, tok = ours
    monkeypatch.setattr(gen, "compile_steps", lambda device, compile_prefill: (gen.prefill, gen.decode_one_token))
    seen, run_once = [], gen.run_once
    monkeypatch.setattr(gen, "run_once", lambda m, t, prompts, *a, **kw: seen.append((prompts[0], kw.get("quiet")))
                        or run_once(m, t, prompts, *a, **kw))
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    argv = ["--checkpoint_path", str(smollm2_checkpoint / "model.pth"), "--chat", "--temperature", "0",
            "--max_new_tokens", "10"]
    for flags in ([], ["--compile"]):
        lines, seen[:] = iter(["What is 2+2?", "And times 3?", ""]), []
        main(argv + flags)
        err = capsys.readouterr().err
        turns = [p for p, quiet in seen if not quiet]
        assert len(turns) == 2 and turns[1][:len(turns[0])] == turns[0]
        first = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True)
        answer = generate(model, [first], 10, stop_ids=tok.eos_ids)[0]
        assert turns[0] == first and tok.decode([t for t in answer if t not in tok.eos_ids]) in tok.decode(turns[1])
        assert err.count("time to first token") == 2
        assert ("compiled in" in err) == bool(flags) and len(seen) == 2 + bool(flags)
        if flags:
            assert err.index("compiled in") < err.index("chat:") and seen[0][1]  # the quiet run came first


def test_cli_chat_takes_the_prompt_as_its_first_turn(smollm2_checkpoint, ours, capsys, monkeypatch):
    """--chat --prompt: the prompt is the first user turn, through the chat template (not ignored), and the chat
    goes on from the keyboard; here stdin is at its end, so it stops after that answer."""
    import builtins

    import generate as gen
    model, tok = ours
    seen, run_once = [], gen.run_once
    monkeypatch.setattr(gen, "run_once", lambda m, t, prompts, *a, **kw: seen.append(prompts[0])
                        or run_once(m, t, prompts, *a, **kw))
    monkeypatch.setattr(builtins, "input", lambda prompt="": (_ for _ in ()).throw(EOFError))
    main(["--checkpoint_path", str(smollm2_checkpoint / "model.pth"), "--chat", "--prompt", "What is 2+2?",
          "--temperature", "0", "--max_new_tokens", "10"])
    out = capsys.readouterr().out
    first = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True)
    answer = generate(model, [first], 10, stop_ids=tok.eos_ids)[0]
    assert seen == [first]
    assert "> What is 2+2?" in out and tok.decode([t for t in answer if t not in tok.eos_ids]).strip() in out


def test_cli_chat_refuses_a_turn_too_long_for_the_cache_and_goes_on(smollm2_checkpoint, capsys, monkeypatch):
    import builtins
    lines = iter(["word " * 60, "Hi", ""])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    main(["--checkpoint_path", str(smollm2_checkpoint / "model.pth"), "--chat", "--temperature", "0",
          "--max_new_tokens", "4", "--max_seq_length", "64"])
    err = capsys.readouterr().err
    assert err.count("too long for a 64-token cache; start a new chat or raise --max_seq_length") == 1
    assert err.count("time to first token") == 1  # the next turn was answered


def test_cli_answer_of_one_token_reports_no_decode_speed(smollm2_checkpoint, ours, capsys):
    """As raw text this question makes the chat model end its turn at once: no decode step, so no speed (not nan)."""
    model, tok = ours
    prompt = "What is the capital of France?"
    assert len(generate(model, [tok.encode(prompt)], 5, stop_ids=tok.eos_ids)[0]) == 1
    main(["--checkpoint_path", str(smollm2_checkpoint / "model.pth"), "--prompt", prompt, "--temperature", "0",
          "--max_new_tokens", "5"])
    err = capsys.readouterr().err
    assert "no decode step after the first token" in err and "nan" not in err
    assert "try --chat" in err  # the empty answer is explained, with the flag that gets one


def test_cli_prompt_too_long_is_one_clear_line(smollm2_checkpoint, capsys):
    import subprocess, sys
    from pathlib import Path
    r = subprocess.run([sys.executable, "generate.py", "--checkpoint_path", str(smollm2_checkpoint / "model.pth"),
                        "--prompt", "word " * 9000, "--max_new_tokens", "8"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in r.stderr


@pytest.mark.parametrize("flags, message", [
    (["--draft_checkpoint_path", "{model}", "--speculate_k", "0"], "--speculate_k must be at least 1"),
    (["--prompts_file", "/nonexistent/prompts.txt"], "prompts file /nonexistent/prompts.txt not found"),
    (["--mtp_checkpoint_path", "/nonexistent/head.pth"], "MTP head /nonexistent/head.pth not found"),
    (["--draft_checkpoint_path", "/nonexistent/draft.pth"], "draft checkpoint /nonexistent/draft.pth not found; "
                                                            "convert one"),
    (["--speculate_k", "3"], "--speculate_k needs a drafter: add --draft_checkpoint_path PATH or --mtp"),
    (["--draft_checkpoint_path", "{model}", "--draft_vocab", "4096"], "--draft_vocab picks rows of the MTP head's"),
    (["--shard_draft"], "--shard_draft splits a draft checkpoint over the processes"),
    (["--prompts_file", "/nonexistent/prompts.txt", "--prompt", "Hi"], "--prompts_file gives the prompts itself; "
                                                                         "drop --prompt"),
    (["--system", "Be terse."], "--system is the chat's system message: add --chat"),
    (["--chat", "--num_samples", "2"], "--chat holds one conversation"),
    (["--compile_prefill"], "--compile_prefill compiles prefill beside the decode step: add --compile"),
])
def test_cli_bad_flags_are_one_clear_line(smollm2_checkpoint, flags, message):
    import subprocess, sys
    from pathlib import Path
    model = str(smollm2_checkpoint / "model.pth")
    r = subprocess.run([sys.executable, "generate.py", "--checkpoint_path", model, "--max_new_tokens", "4",
                        *(f.format(model=model) for f in flags)], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=300)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error: ") and message in last and "Traceback" not in r.stderr
