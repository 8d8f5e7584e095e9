"""The tokenizer part of a GGUF file, written as llama.cpp's convert_hf_to_gguf.py writes it.

llama.cpp runs its own tokenizer from the file: the vocabulary, token types, merges, special ids and,
for byte-level BPE, the *pre-tokenizer* (`tokenizer.ggml.pre`), the regex split applied before the
merges. llama.cpp does not read the split from tokenizer.json; it knows a fixed list of them by name
and refuses a file whose name it does not know ("unknown pre-tokenizer type"). The name is found as
llama.cpp's converter finds it (`get_vocab_base_pre`): the sha256 of the token ids of a check text,
looked up in llama.cpp's own table (llamacpp_pre.py). An unknown tokenizer is an error, not a guess.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from hashlib import sha256
from typing import Any

from lorakit.errors import LorakitError
from lorakit.export.llamacpp_pre import CHECK_TEXT, PRE_TOKENIZER_HASHES

PRE_NAMES = frozenset(PRE_TOKENIZER_HASHES.values())


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]  # gguf.TokenType per token
    merges: list[str]
    pre: str  # tokenizer.ggml.pre


def pre_tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of str(token ids of CHECK_TEXT): exactly what llama.cpp's converter hashes."""
    return sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def pre_tokenizer(tokenizer: Any, override: str | None = None) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer (`smollm`, `llama-bpe`, `qwen2`, `gpt-2`, ...)."""
    if override is not None:
        if override not in PRE_NAMES:
            raise LorakitError(f"--pre {override!r} is not a pre-tokenizer llama.cpp knows; "
                               f"use one of {', '.join(sorted(PRE_NAMES))}")
        return override
    digest = pre_tokenizer_hash(tokenizer)
    name = PRE_TOKENIZER_HASHES.get(digest)
    if name is None:
        raise LorakitError(f"GGUF export: llama.cpp does not know this tokenizer's pre-tokenizer (check hash {digest[:16]}, "
                           "not in llama.cpp's table) and would refuse the file; if you know which it matches, "
                           "pass --pre NAME (e.g. gpt-2, llama-bpe, qwen2, smollm)")
    return name


def _check_byte_level_bpe(spec: dict[str, Any]) -> None:
    model = spec.get("model", {})
    if model.get("type") == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer")):
        return
    if model.get("type") in ("Unigram", "BPE") and ("Metaspace" in json.dumps(spec) or model.get("byte_fallback")):
        raise LorakitError("GGUF export: this is a SentencePiece-style tokenizer (Llama-2 / Mistral / Gemma); lorakit writes "
                           "byte-level BPE ones only; run `lorakit merge` and llama.cpp's convert_hf_to_gguf.py on its output")
    raise LorakitError("GGUF export supports byte-level BPE tokenizers (GPT-2 / Llama-3 / Qwen / SmolLM style); "
                       f"this tokenizer is {model.get('type', '?')}")


def _looks_special(text: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special, for added tokens not flagged special."""
    return text in ("<pad>", "<mask>") or (text.startswith("<|") and text.endswith("|>"))


def vocab_fields(tokenizer: Any, vocab_size: int, pre: str | None = None) -> Vocab:
    """Tokens ([PADi] for holes up to the model's vocab size), types, merges and the pre-tokenizer name."""
    import gguf

    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        raise LorakitError("GGUF export needs the model's fast tokenizer (tokenizer.json)")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    _check_byte_level_bpe(spec)
    name = pre_tokenizer(tokenizer, pre)
    vocab = tokenizer.get_vocab()
    size = max(vocab_size, max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    special = set(tokenizer.all_special_tokens)
    for added in spec.get("added_tokens", []):
        i, text = added["id"], added["content"]
        if i < size:
            tokens[i] = text
            control = added.get("special") or text in special or _looks_special(text)
            types[i] = gguf.TokenType.CONTROL if control else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return Vocab(tokens, [int(t) for t in types], merges, name)


def add_vocab(writer: Any, tokenizer: Any, vocab: Vocab) -> None:
    """Tokenizer keys: model, pre-tokenizer, tokens, types, merges, special ids, BOS flag, chat template."""
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for setter, token_id in (("add_bos_token_id", tokenizer.bos_token_id), ("add_eos_token_id", tokenizer.eos_token_id),
                             ("add_unk_token_id", tokenizer.unk_token_id), ("add_pad_token_id", tokenizer.pad_token_id)):
        if token_id is not None:
            getattr(writer, setter)(int(token_id))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
