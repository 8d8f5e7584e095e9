"""Loss masks token by token for each template, and prompts that are exact prefixes."""

from __future__ import annotations

import copy

import pytest

from lorakit.data import IGNORE, render, render_prompt, tokenize_example
from lorakit.errors import DataError
from tests.conftest import tiny_tokenizer

TOK = tiny_tokenizer()
ONE_TURN = [{"role": "user", "content": "what is the capital of france?"},
            {"role": "assistant", "content": "paris."}]
TWO_TURNS = [{"role": "system", "content": "answer briefly"},
             {"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
             {"role": "user", "content": "how are you?"}, {"role": "assistant", "content": "the quick fox"}]


def expected(segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Reference ids and labels: each segment tokenized alone, trained or not."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        part = TOK(text, add_special_tokens=False)["input_ids"]
        ids += part
        labels += part if trained else [IGNORE] * len(part)
    return ids, labels


def check(messages: list[dict], template: str, segments: list[tuple[str, bool]], system: str | None = None) -> None:
    rendered = render(messages, template, TOK, system)
    assert rendered.text == "".join(text for text, _ in segments)
    ex = tokenize_example(rendered, TOK, 512)
    ids, labels = expected(segments)
    assert ex.input_ids == ids  # the segments tokenize independently, so the reference is exact
    assert ex.labels == labels
    assert ex.missing_eos == 0 and not ex.truncated
    assert ex.num_trained == sum(1 for x in labels[1:] if x != IGNORE)


def test_chatml_single_turn_mask() -> None:
    check(ONE_TURN, "chatml", [("<|im_start|>user\nwhat is the capital of france?<|im_end|>\n<|im_start|>assistant\n", False),
                               ("paris.<|im_end|>", True), ("\n", False)])


def test_chatml_multi_turn_trains_every_answer_and_no_user_turn() -> None:
    check(TWO_TURNS, "chatml", [
        ("<|im_start|>system\nanswer briefly<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", False),
        ("world<|im_end|>", True),
        ("\n<|im_start|>user\nhow are you?<|im_end|>\n<|im_start|>assistant\n", False),
        ("the quick fox<|im_end|>", True), ("\n", False)])


def test_llama2_masks() -> None:
    check(ONE_TURN, "llama2", [("<s>[INST] what is the capital of france? [/INST]", False), (" paris. </s>", True)])
    check(TWO_TURNS, "llama2", [
        ("<s>[INST] <<SYS>>\nanswer briefly\n<</SYS>>\n\nhello [/INST]", False), (" world </s>", True),
        ("<s>[INST] how are you? [/INST]", False), (" the quick fox </s>", True)])


def test_alpaca_template_ends_answers_with_eos() -> None:
    check(ONE_TURN, "alpaca", [
        ("Below is an instruction that describes a task. Write a response that appropriately completes the request."
         "\n\n### Instruction:\nwhat is the capital of france?\n\n### Response:\n", False),
        ("paris.<|im_end|>", True)])


def test_system_prompt_inserted_only_when_missing() -> None:
    check(ONE_TURN, "chatml", [("<|im_start|>system\nbe kind<|im_end|>\n<|im_start|>user\nwhat is the capital of france?"
                                "<|im_end|>\n<|im_start|>assistant\n", False), ("paris.<|im_end|>", True), ("\n", False)],
          system="be kind")
    assert "be kind" not in render(TWO_TURNS, "chatml", TOK, "be kind").text


@pytest.mark.parametrize("messages", [ONE_TURN, TWO_TURNS])
def test_tokenizer_template_matches_chatml(messages: list[dict]) -> None:
    ours = render(messages, "chatml", TOK, "sys")
    theirs = render(messages, "tokenizer", TOK, "sys")
    assert render(messages, "auto", TOK, "sys") == theirs
    assert theirs == ours
    assert tokenize_example(theirs, TOK, 512).labels == tokenize_example(ours, TOK, 512).labels


@pytest.mark.parametrize("template", ["chatml", "llama2", "alpaca", "tokenizer"])
@pytest.mark.parametrize("messages", [ONE_TURN, TWO_TURNS])
def test_render_prompt_is_the_prefix_of_render(template: str, messages: list[dict]) -> None:
    rendered = render(messages, template, TOK, "sys")
    prompt = render_prompt(messages, template, TOK, "sys")
    assert rendered.text.startswith(prompt) and len(prompt) == rendered.train_spans[-1][0]
    assert render_prompt(messages[:-1], template, TOK, "sys") == prompt  # same prompt without the answer
    full = tokenize_example(rendered, TOK, 512).input_ids
    prompt_ids = TOK(prompt, add_special_tokens=False)["input_ids"]
    assert full[: len(prompt_ids)] == prompt_ids  # no token straddles the prompt / answer boundary


def test_tokenizer_generation_prompt_is_the_templates_own() -> None:
    expected_prompt = TOK.apply_chat_template(ONE_TURN[:1], tokenize=False, add_generation_prompt=True)
    assert render_prompt(ONE_TURN[:1], "tokenizer", TOK) == expected_prompt


def _with_template(template: str):
    tok = copy.copy(TOK)
    tok.chat_template = template
    return tok


def test_template_without_eos_gets_eos_appended_and_trained() -> None:
    tok = _with_template("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    rendered = render(TWO_TURNS, "tokenizer", tok)
    assert [rendered.text[a:b] for a, b in rendered.train_spans] == ["world</s>\n<|im_end|>",
                                                                     "the quick fox</s>\n<|im_end|>"]
    assert rendered.text.endswith("<|im_end|>")
    ex = tokenize_example(rendered, tok, 512)
    assert ex.missing_eos == 0
    assert ex.labels[-1] == TOK.eos_token_id
    assert rendered.text.startswith(render_prompt(TWO_TURNS, "tokenizer", tok))


def test_template_that_rewrites_past_turns_is_an_error() -> None:
    tok = _with_template("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|im_start|>assistant\n"
                         "<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    render(ONE_TURN, "tokenizer", tok)  # one answer: fine
    with pytest.raises(DataError, match="data.template: chatml"):
        render(TWO_TURNS, "tokenizer", tok)


def test_plain_text_is_trained_with_eos() -> None:
    rendered = render("hello world", "chatml", TOK)
    assert rendered.text == "hello world<|im_end|>" and rendered.train_spans == [(0, len(rendered.text))]
    ex = tokenize_example(rendered, TOK, 512)
    assert ex.labels == ex.input_ids and ex.num_trained == len(ex.input_ids) - 1
