"""One small tokenizer interface over the three vocabulary files our checkpoints come with.

- sentencepiece `tokenizer.model` (Llama-2, Mistral, CodeLlama): run by sentencepiece itself.
- tiktoken-format `tokenizer.model` (Llama-3/3.1/3.2: "<base64 token> <rank>" per line): run by tiktoken with
  Meta's split regex and special tokens, exactly as Meta's reference tokenizer does.
- byte-level BPE `tokenizer.json` (SmolLM2, Qwen2.5, Llama-3 HF exports): translated into a tiktoken encoding,
  because tiktoken is a runtime dependency anyway and is fast. The parity reference is the model's own HF tokenizer.

Decisions (each matches what the model's HF tokenizer does unless noted):
- encode(text) treats special/added token text in `text` ("<|im_start|>") as that token, as HF does; pass
  special=False to keep untrusted text literal. sentencepiece never parses special text (as sentencepiece and
  Meta's reference do).
- encode(text, bos=None) adds BOS when the HF tokenizer would: add_bos_token from tokenizer_config.json, else
  the tokenizer.json post-processor template, else yes for sentencepiece and tiktoken Llama-3. (Where the two
  disagree, add_bos_token wins, as in llama.cpp and transformers 4; transformers 5 reads only the post-processor.)
- decode is lossless: byte-level kinds print special tokens as their text (HF's default, and Meta's for Llama-3);
  sentencepiece drops control tokens (<s>, </s>) as sentencepiece does. No "clean_up_tokenization_spaces".
- Chat templates are written in Python (no jinja2 at runtime); the family is chosen from the special tokens.
"""

import base64
import json
import re
import unicodedata
from pathlib import Path

GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Meta's Llama-3.1 reference list; the remaining slots up to 256 are <|reserved_special_token_{2+i}|>.
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character table: byte-level vocabularies spell every byte as one character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


class Tokenizer:
    """What generation needs from a vocabulary. Subclasses set special (text -> id), vocab_size, eos_ids and
    implement _encode, decode and token_id."""

    bos_id: int | None = None
    eos_id: int | None = None  # the vocabulary's own end-of-sequence token; Llama-2 chat closes turns with it
    pad_id: int | None = None
    add_bos: bool = False
    chat_template: str = ""  # raw HF template, only mined for the default system prompt

    def encode(self, text: str, bos: bool | None = None, special: bool = True) -> list[int]:
        ids = self._encode(text, special)
        if (self.add_bos if bos is None else bos) and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Same ids as transformers' apply_chat_template(..., tokenize=True) for ChatML and Llama-3 templates:
        both render text and tokenize it without adding BOS, and so do we."""
        if "<|im_start|>" in self.special:
            system = _default_system(self.chat_template)
            if system is not None and messages and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": system}, *messages]
            text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return self.encode(text + ("<|im_start|>assistant\n" if add_generation_prompt else ""), bos=False)
        if "<|start_header_id|>" in self.special:
            def header(role):
                return f"<|start_header_id|>{role}<|end_header_id|>\n\n"
            text = "".join(header(m["role"]) + m["content"].strip() + "<|eot_id|>" for m in messages)
            text = "<|begin_of_text|>" + text + (header("assistant") if add_generation_prompt else "")
            return self.encode(text, bos=False)
        return self._llama2_chat(messages)

    def _llama2_chat(self, messages: list[dict]) -> list[int]:
        """Meta's Llama-2 reference format: each user/assistant pair is BOS [INST] u [/INST] a EOS; the system
        prompt is folded into the first user turn; a final user turn is left open for the answer."""
        if messages and messages[0]["role"] == "system":
            if len(messages) < 2:
                raise ValueError("a Llama-2 chat needs a user message after the system message")
            first = f"<<SYS>>\n{messages[0]['content']}\n<</SYS>>\n\n{messages[1]['content']}"
            messages = [{"role": messages[1]["role"], "content": first}, *messages[2:]]
        roles = [m["role"] for m in messages]
        if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2):
            raise ValueError("Llama-2 chat messages must alternate user/assistant after an optional system message")
        ids = []
        for user, answer in zip(messages[::2], messages[1::2]):
            text = f"[INST] {user['content'].strip()} [/INST] {answer['content'].strip()} "
            ids += self.encode(text, bos=True) + [self.eos_id]
        if len(messages) % 2:
            ids += self.encode(f"[INST] {messages[-1]['content'].strip()} [/INST]", bos=True)
        return ids

    def _configure(self, cfg: dict, template: str) -> None:
        """Apply tokenizer_config.json (bos/eos/pad names, add_bos_token) and collect the ids that end a turn."""
        def name(v):
            return v.get("content") if isinstance(v, dict) else v
        for key, attr in (("bos_token", "bos_id"), ("eos_token", "eos_id"), ("pad_token", "pad_id")):
            if name(cfg.get(key)) is not None and (i := self.token_id(name(cfg[key]))) is not None:
                setattr(self, attr, i)
        if cfg.get("add_bos_token") is not None:
            self.add_bos = bool(cfg["add_bos_token"])
        self.eos_ids = {i for i in (self.eos_id, *map(self.special.get, STOP_TOKENS)) if i is not None}
        self.chat_template = template


def _default_system(template: str) -> str | None:
    """The literal system prompt a ChatML template inserts when none is given (SmolLM2, Qwen2.5): the text
    between '<|im_start|>system\\n' and '<|im_end|>' that contains no quote or brace, i.e. is not a variable."""
    m = re.search(r"<\|im_start\|>system(?:\\n|\n)([^'\"{}]+?)<\|im_end\|>", template or "")
    return m.group(1).replace("\\n", "\n") if m else None


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: Path):
        import sentencepiece
        self.sp = sentencepiece.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is neither a sentencepiece model nor a tiktoken vocabulary ({e}); "
                             "re-download the model's tokenizer.model") from None
        sp, n = self.sp, self.sp.vocab_size()
        self.vocab_size, self.add_bos = n, True
        self.special = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
        self.bos_id, self.eos_id, self.pad_id = (i if i >= 0 else None for i in (sp.bos_id(), sp.eos_id(), sp.pad_id()))

    def _encode(self, text: str, special: bool) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def token_id(self, text: str) -> int | None:
        i = self.sp.piece_to_id(text)
        return None if i == self.sp.unk_id() and text != self.sp.id_to_piece(i) else i


class BPETokenizer(Tokenizer):
    """Byte-level BPE run by tiktoken. tiktoken's token numbers are its "ranks" (merge priority), which need not be
    the model's ids, so encode maps ranks to ids through rank_to_id (-1: a byte the vocabulary lacks, dropped as HF
    does) and decode uses an id -> bytes table. Known difference: HF drops such a byte before merging, so in "!\x13!"
    (SmolLM2 has no \x13) HF merges "!!" and we do not; only text with those rare control bytes is affected."""

    def __init__(self, pattern: str, ranks: dict[bytes, int], rank_to_id: list[int], specials: dict[str, int],
                 id_bytes: list[bytes], nfc: bool = False):
        import tiktoken
        try:
            self._enc = tiktoken.Encoding("mtp-fast", pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
        except ValueError as e:
            raise ValueError(f"tiktoken rejects this vocabulary or its split regex {pattern!r}: {e}") from None
        self._rank_to_id, self._id_bytes, self._nfc = rank_to_id, id_bytes, nfc
        self.special = {s: rank_to_id[r] for s, r in specials.items()}
        self.vocab_size, self.eos_ids = len(id_bytes), set()

    def _encode(self, text: str, special: bool) -> list[int]:
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        ranks = self._enc.encode(text, allowed_special="all" if special else set(), disallowed_special=())
        return [i for i in map(self._rank_to_id.__getitem__, ranks) if i >= 0]

    def decode(self, ids: list[int]) -> str:
        return b"".join(self._id_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def token_id(self, text: str) -> int | None:
        if text in self.special:
            return self.special[text]
        ids = self._encode(text, special=False)
        return ids[0] if len(ids) == 1 else None


def _tiktoken_model(path: Path) -> BPETokenizer:
    """Llama-3's tokenizer.model: ranks are the ids, and the 256 special tokens follow the last rank."""
    ranks = {}
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{path} line {n} is not '<base64 token> <rank>': the file is corrupt, "
                             "re-download it") from None
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise ValueError(f"{path}: ranks are not 0..{n - 1} each once: the file is corrupt, re-download it")
    names = LLAMA3_SPECIALS + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIALS))]
    id_bytes = sorted(ranks, key=ranks.get) + [s.encode() for s in names]
    tok = BPETokenizer(LLAMA3_PATTERN, ranks, list(range(n + len(names))),
                       {s: n + i for i, s in enumerate(names)}, id_bytes)
    tok.add_bos, tok.bos_id, tok.eos_id = True, n, n + 1
    tok.pad_id = tok.special["<|finetune_right_pad_id|>"]
    return tok


def _split_pattern(pre: dict | None) -> str:
    """The tiktoken regex equal to the tokenizer.json pre-tokenizer. Supported: ByteLevel(use_regex) (GPT-2's
    regex), Split(Regex, Isolated) + ByteLevel (Llama-3, Qwen2: that regex, same dialect in both libraries), and
    Digits + ByteLevel(use_regex) (SmolLM2). Digits cuts numbers out first, so in the GPT-2 regex a number takes
    no leading space and a digit ends a whitespace run just as the end of the text does."""
    steps = (pre or {}).get("pretokenizers", [pre or {}])
    kinds, first, last = [s.get("type") for s in steps], steps[0], steps[-1]
    if kinds[-1] == "ByteLevel" and not last.get("add_prefix_space"):
        regex = last.get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            return GPT2_PATTERN
        if kinds == ["Split", "ByteLevel"] and not regex and "Regex" in first.get("pattern", {}) \
                and first.get("behavior") == "Isolated" and not first.get("invert"):
            return first["pattern"]["Regex"]
        if kinds == ["Digits", "ByteLevel"] and regex:
            digits = r"\p{N}" if first.get("individual_digits") else r"\p{N}+"
            return r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|" + digits + r"| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
    raise ValueError(f"tokenizer.json pre_tokenizer {json.dumps(pre)[:160]} is not supported")


def _is_byte_level(j: dict) -> bool:
    pre = j.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    model = j.get("model") or {}
    return model.get("type") == "BPE" and not model.get("byte_fallback") and \
        any(s.get("type") == "ByteLevel" for s in steps)


def _hf_tokenizer_json(path: Path, j: dict) -> BPETokenizer:
    """Byte-level BPE from tokenizer.json as tiktoken ranks: a merged token's rank is its merge's position, so
    tiktoken (merge the adjacent pair whose concatenation ranks lowest) follows HF's merges order."""
    model, added = j["model"], {t["content"]: t["id"] for t in j.get("added_tokens", [])}
    normalizer = (j.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):  # Qwen2's NFC is the only one byte-level vocabularies use
        raise ValueError(f"{path}: normalizer {normalizer} is not supported")
    vocab, b2u = model["vocab"], _bytes_to_unicode()
    u2b = {c: b for b, c in b2u.items()}

    def to_bytes(token):
        try:
            return bytes(u2b[c] for c in token)
        except KeyError:
            raise ValueError(f"{path}: token {token!r} is not byte-level BPE; this tokenizer.json is not supported")

    ranks, rank_to_id = {bytes([b]): b for b in range(256)}, [vocab.get(b2u[b], -1) for b in range(256)]
    merged = (m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", []))
    # ignore_merges: HF first looks the whole pre-token up in the vocab, as tiktoken always does.
    tokens = [a + b for a, b in merged] + (list(vocab) if model.get("ignore_merges") else [])
    for token in tokens:
        if token in vocab and token not in added and (tb := to_bytes(token)) not in ranks:
            ranks[tb] = len(rank_to_id)
            rank_to_id.append(vocab[token])
    specials = {s: len(rank_to_id) + k for k, s in enumerate(added)}
    rank_to_id += added.values()
    id_bytes = [b""] * (max([*vocab.values(), *added.values()]) + 1)
    for token, i in vocab.items():
        if token not in added:
            id_bytes[i] = to_bytes(token)
    for token, i in added.items():
        id_bytes[i] = token.encode()
    tok = BPETokenizer(_split_pattern(j.get("pre_tokenizer")), ranks, rank_to_id, specials, id_bytes,
                       nfc=normalizer == "NFC")
    post = j.get("post_processor") or {}
    for p in post.get("processors", [post]):  # BOS in the single-sequence template (Llama-3 exports)
        if p.get("type") == "TemplateProcessing" and "SpecialToken" in p["single"][0]:
            tok.bos_id, tok.add_bos = added.get(p["single"][0]["SpecialToken"]["id"]), True
    return tok


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download or re-convert the tokenizer files") from None


def get_tokenizer(checkpoint_dir: Path) -> Tokenizer:
    """Pick the tokenizer from the files in checkpoint_dir: a byte-level tokenizer.json first, else tokenizer.model
    (tiktoken text or sentencepiece proto), then apply tokenizer_config.json when present."""
    d = Path(checkpoint_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint folder {d} does not exist; pass the folder that holds the tokenizer")
    js, model, cfg_path = d / "tokenizer.json", d / "tokenizer.model", d / "tokenizer_config.json"
    j = _read_json(js) if js.exists() else None
    if j is not None and (_is_byte_level(j) or not model.exists()):
        if not _is_byte_level(j) or not isinstance(j["model"].get("vocab"), dict):
            raise ValueError(f"{js} is not a byte-level BPE tokenizer; put the model's tokenizer.model beside it")
        tok = _hf_tokenizer_json(js, j)
    elif model.exists():
        with model.open("rb") as f:
            head = f.readline().strip()
        tiktoken_text = re.fullmatch(rb"[A-Za-z0-9+/]+=* \d+", head) is not None
        tok = _tiktoken_model(model) if tiktoken_text else SentencePieceTokenizer(model)
    else:
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {d}; copy the model's tokenizer files "
                                "there (convert_hf_checkpoint.py writes them)")
    cfg = _read_json(cfg_path) if cfg_path.exists() else {}
    template = cfg.get("chat_template") or ""
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = next((t["template"] for t in template if t.get("name") == "default"), "")
    if not template and (d / "chat_template.jinja").exists():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    tok._configure(cfg, template)
    return tok


class StreamDecoder:
    """Turns ids arriving one at a time into printable text. It decodes a short window that starts at the last
    printed token (context for sentencepiece's leading-space rule) and holds text back while it ends in U+FFFD
    (an unfinished UTF-8 sequence), so the pieces put() and flush() return join to tokenizer.decode(all ids)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok, self.ids, self.start, self.printed = tokenizer, [], 0, 0

    def put(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.start:self.printed])
        text = self.tok.decode(self.ids[self.start:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.start, self.printed = self.printed, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """Whatever is still held back (an unfinished UTF-8 sequence prints as U+FFFD, as decode does)."""
        text = self.tok.decode(self.ids[self.start:])[len(self.tok.decode(self.ids[self.start:self.printed])):]
        self.start = self.printed = len(self.ids)
        return text
