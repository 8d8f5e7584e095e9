"""Tokenization: unshifted labels, no added specials, truncation keeps the start."""

from __future__ import annotations

from lorakit.data import IGNORE, Rendered, render, tokenize_example
from tests.conftest import tiny_tokenizer

TOK = tiny_tokenizer()
CONV = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog"},
        {"role": "assistant", "content": "hello world, how are you?"}]


def test_labels_are_aligned_not_shifted_and_no_bos_added() -> None:
    ex = tokenize_example(render(CONV, "chatml", TOK), TOK, 512)
    assert len(ex.labels) == len(ex.input_ids)
    assert all(label in (IGNORE, tok) for label, tok in zip(ex.labels, ex.input_ids))
    assert ex.input_ids[0] != TOK.bos_token_id and ex.input_ids[0] == TOK.convert_tokens_to_ids("<|im_start|>")
    assert ex.labels[-2] == TOK.eos_token_id  # <|im_end|> trained; the final "\n" is not
    assert ex.labels[-1] == IGNORE


def test_truncation_keeps_the_start_and_counts_the_cut() -> None:
    full = tokenize_example(render(CONV, "chatml", TOK), TOK, 512)
    cut = tokenize_example(render(CONV, "chatml", TOK), TOK, len(full.input_ids) - 5)
    assert cut.truncated and cut.cut == 5
    assert cut.input_ids == full.input_ids[:-5] and cut.labels == full.labels[:-5]
    assert cut.missing_eos == 1  # the answer lost its EOS
    prompt_only = tokenize_example(render(CONV, "chatml", TOK), TOK, 8)
    assert prompt_only.num_trained == 0


def test_multi_token_end_of_turn_counts_as_missing_eos() -> None:
    tok_without_s = render(CONV, "llama2", TOK)  # "</s>" is one token in the tiny vocab
    assert tokenize_example(tok_without_s, TOK, 512).missing_eos == 0
    fake = Rendered("ab<eot>", [(0, 7)], "<eot>")
    assert tokenize_example(fake, TOK, 512).missing_eos == 1
