"""Generation uses training's prompt rendering; batched, greedy/sampled, stop strings; generate and chat CLIs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.eval.generate import GenerationSettings, InferenceModel, generate, load_for_inference, prompt_text
from tests.conftest import run_cli, tiny_lm_for, tiny_tokenizer
from tests.train.test_train_cli import WORDS


def test_prompt_tokens_are_the_training_prompt_tokens() -> None:
    from lorakit.data.templates import render
    from lorakit.data.tokenize import tokenize_example

    tok = tiny_tokenizer()
    im = InferenceModel(tiny_lm_for(tok), tok, "auto", "be brief")
    conv = [{"role": "user", "content": "what is the capital of france?"}, {"role": "assistant", "content": "paris."}]
    rendered = render(conv, "auto", tok, "be brief")
    example = tokenize_example(rendered, tok, 512)
    n_prompt = next(i for i, label in enumerate(example.labels) if label != -100)
    prompt_ids = tok(prompt_text(conv[:1], im), add_special_tokens=False)["input_ids"]
    assert prompt_ids == list(example.input_ids[:n_prompt])


def test_batched_greedy_equals_one_by_one_and_sampling_is_seeded() -> None:
    tok = tiny_tokenizer()
    im = InferenceModel(tiny_lm_for(tok), tok)
    prompts = ["hello world", "what is the capital of france? tell me more please", "fox"]
    settings = GenerationSettings(max_new_tokens=8)
    batched = generate(im, prompts, settings, batch_size=3)
    single = [generate(im, [p], settings, batch_size=1)[0] for p in prompts]
    assert batched == single and any(batched)
    sampled = GenerationSettings(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert generate(im, prompts, sampled) == generate(im, prompts, sampled)


def test_stop_strings_cut_the_answer() -> None:
    tok = tiny_tokenizer()
    im = InferenceModel(tiny_lm_for(tok), tok)
    full = generate(im, ["hello"], GenerationSettings(max_new_tokens=30))[0]
    assert len(full) > 2
    stop = full[1:3]
    cut = generate(im, ["hello"], GenerationSettings(max_new_tokens=12, stop=[stop]))[0]
    assert cut == full[: full.find(stop)].strip()


def test_settings_are_checked() -> None:
    from lorakit.errors import LorakitError

    for bad in (GenerationSettings(max_new_tokens=0), GenerationSettings(temperature=-1),
                GenerationSettings(top_p=0)):
        with pytest.raises(LorakitError):
            bad.check()


def test_the_trained_adapter_answers_what_it_learned(trained: Path) -> None:
    im = load_for_inference(None, trained / "run" / "adapter", "fp32")
    assert im.system_prompt == "answer briefly" and im.name == str(trained / "model")
    answers = generate(im, [f"what comes after {w}?" for w in WORDS[:4]], GenerationSettings(max_new_tokens=30))
    expected = [f"after {a} comes {WORDS[(i * 3 + 1) % len(WORDS)]}." for i, a in enumerate(WORDS[:4])]
    assert sum(a == e for a, e in zip(answers, expected)) >= 3, answers  # learned, and stops at end of turn
    base = load_for_inference(str(trained / "model"), None, "fp32")
    assert generate(base, ["what comes after red?"], GenerationSettings(max_new_tokens=30))[0] != expected[0]


def test_generate_cli_prompt_and_file(trained: Path, tmp_path: Path) -> None:
    adapter = str(trained / "run" / "adapter")
    proc = run_cli("generate", "--adapter", adapter, "--prompt", "what comes after red?", "--max-new-tokens", "30")
    assert proc.returncode == 0, proc.stderr
    assert "after red comes green." in proc.stdout
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "what comes after blue?"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "what comes after fox?"}, {"role": "assistant", "content": "x"}]}) + "\n")
    out = tmp_path / "answers.jsonl"
    proc = run_cli("generate", "--adapter", adapter, "--file", str(prompts), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["prompt"] == "what comes after blue?" and "output" in rows[1]
    proc = run_cli("generate", "--adapter", adapter, "--file", str(prompts), "--out", str(out))
    assert proc.returncode == 2 and "already exists" in proc.stderr
    proc = run_cli("generate", "--adapter", adapter)
    assert proc.returncode == 2 and "give --prompt TEXT" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("generate", "--adapter", adapter, "--prompt", "x", "--temperature", "-1")
    assert proc.returncode == 2 and "temperature must be >= 0" in proc.stderr


def test_chat_two_turns_reset_system_and_exit(trained: Path) -> None:
    script = "what comes after red?\n/reset\n/system be terse\nwhat comes after blue?\n/help\n/exit\n"
    proc = subprocess.run([sys.executable, "-m", "lorakit", "chat", "--adapter", str(trained / "run" / "adapter"),
                           "--max-new-tokens", "30"], input=script, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.count("model> ") == 2
    assert "after red comes green." in out
    assert "(history cleared)" in out and "(system prompt set; history cleared)" in out
    assert "(commands: /reset, /system TEXT, /exit)" in out
    # end of input also ends the chat cleanly
    proc = subprocess.run([sys.executable, "-m", "lorakit", "chat", "--adapter", str(trained / "run" / "adapter")],
                          input="", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_shared_system_prompt_is_run_once_and_changes_nothing(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import lorakit.eval.generate as gen

    tok = tiny_tokenizer()
    im = InferenceModel(tiny_lm_for(tok, arch), tok, "auto", "you are a careful assistant. answer in one short line.")
    prompts = ["hello world", "what is the capital of france? tell me more please", "fox"]
    settings = GenerationSettings(max_new_tokens=10)
    calls: list[int] = []
    real = gen._common_prefix
    monkeypatch.setattr(gen, "_common_prefix", lambda ids: calls.append(real(ids)) or calls[-1])
    shared = generate(im, prompts, settings, batch_size=3)
    assert calls and calls[0] >= gen.SHARED_PREFIX_MIN  # the system prompt was shared
    monkeypatch.setattr(gen, "SHARED_PREFIX_MIN", 10**9)
    plain = generate(im, prompts, settings, batch_size=3)
    single = [generate(im, [p], settings, batch_size=1)[0] for p in prompts]
    assert shared == plain == single and any(shared)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decoding_equals_transformers_generate_and_finished_rows_leave_the_batch(
        arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import lorakit.eval.generate as gen

    tok = tiny_tokenizer()
    model = tiny_lm_for(tok, arch).eval()
    im = InferenceModel(model, tok, "auto", "you are a careful assistant. answer in one short line.")
    prompts = ["hello world", "what is the capital of france? tell me more please", "fox", "the quick brown fox jumps"]

    def reference(prompt: str, eos: list[int] | None) -> list[int]:  # transformers' generate, one prompt at a time
        enc = tok(prompt_text(prompt, im), return_tensors="pt", add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=12, do_sample=False, temperature=None, top_p=None, top_k=None,
                             eos_token_id=eos, pad_token_id=tok.pad_token_id or 0)
        return out[0, enc["input_ids"].shape[1]:].tolist()

    first = reference(prompts[0], None)
    stop = first[2]  # an end token the first prompt reaches at its third step: that row finishes early
    refs = [reference(p, [stop]) for p in prompts]
    monkeypatch.setattr(gen, "stop_token_ids", lambda im: [stop])
    widths: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: widths.append(kw["input_ids"].shape[0]), with_kwargs=True)
    ours = generate(im, prompts, GenerationSettings(max_new_tokens=12), batch_size=4)
    hook.remove()
    want = [tok.decode([t for t in r if t != stop], skip_special_tokens=True).strip() for r in refs]
    assert ours == want
    assert len(set(map(len, refs))) > 1 and min(map(len, refs)) < 12  # some rows ended before others
    assert widths[-1] < 4 and sorted(widths[1:], reverse=True) == widths[1:]  # and left the batch
