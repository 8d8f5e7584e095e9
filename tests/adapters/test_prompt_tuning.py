"""Prompt tuning: PEFT's PROMPT_TUNING format both ways, PEFT's inits, packed rows, generation, refusals.

PEFT is the reference throughout: PeftModel.forward prepends the virtual tokens to inputs_embeds
(and returns logits for them too: the real positions are compared), PromptEmbedding's TEXT and
RANDOM inits, and PeftModel.generate for greedy answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorakit.adapters import adapter_info, load_adapter, save_adapter
from lorakit.adapters.prompt_tuning import (inject_prompt_tuning, model_virtual_ids, prompt_embedding, text_init,
                                            virtual_token_ids)
from lorakit.errors import LorakitError
from tests.conftest import save_tiny_model_dir, tiny_lm_for, tiny_model, tiny_tokenizer

peft = pytest.importorskip("peft")

N = 5  # virtual tokens


def with_virtual(ids: torch.Tensor, n: int = N) -> torch.Tensor:
    """(B, T) ids -> (B, n + T): the virtual tokens in front, as lorakit feeds a prompt-tuned model."""
    return torch.cat([torch.tensor(virtual_token_ids(n)).expand(ids.shape[0], n), ids], dim=1)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_peft_loads_what_lorakit_saves(arch: str, tmp_path: Path, input_ids: torch.Tensor) -> None:
    ours = tiny_model(arch)
    torch.manual_seed(3)
    inject_prompt_tuning(ours, N)
    with torch.no_grad():
        expected = ours(input_ids=with_virtual(input_ids)).logits[:, N:]
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=f"tiny-{arch}")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {k: config[k] for k in ("peft_type", "task_type", "num_virtual_tokens", "token_dim",
                                   "num_transformer_submodules", "num_layers", "prompt_tuning_init")} == {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": N, "token_dim": 64,
        "num_transformer_submodules": 1, "num_layers": 2, "prompt_tuning_init": "RANDOM"}
    theirs = peft.PeftModel.from_pretrained(tiny_model(arch), tmp_path / "adapter")
    with torch.no_grad():  # PEFT extends the attention mask by the virtual tokens itself
        got = theirs(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    assert got.shape[1] == N + input_ids.shape[1]
    assert (got[:, N:] - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_lorakit_loads_what_peft_saves(arch: str, tmp_path: Path, input_ids: torch.Tensor) -> None:
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=7)
    theirs = peft.get_peft_model(tiny_model(arch), cfg).eval()
    with torch.no_grad():
        expected = theirs(input_ids=input_ids).logits[:, 7:]
    theirs.save_pretrained(tmp_path / "peft-adapter")
    ours = tiny_model(arch)
    info = load_adapter(ours, tmp_path / "peft-adapter")
    assert model_virtual_ids(ours) == virtual_token_ids(7)
    with torch.no_grad():
        got = ours(input_ids=with_virtual(input_ids, 7)).logits[:, 7:]
    assert (got - expected).abs().max().item() <= 1e-5
    assert (info.method, info.num_virtual_tokens, info.token_dim, info.num_params) == ("prompt_tuning", 7, 64, 7 * 64)
    assert not any(p.requires_grad for p in ours.parameters())  # loaded for inference


@pytest.mark.parametrize("n", [3, 11])  # fewer virtual tokens than the text has (cut), more (repeated)
def test_text_init_equals_peft(n: int, tmp_path: Path) -> None:
    model_dir = save_tiny_model_dir(tmp_path / "model")
    text = "what is the capital of france?"
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prompt_tuning_init="TEXT",
                                  prompt_tuning_init_text=text, tokenizer_name_or_path=str(model_dir))
    tok = tiny_tokenizer()
    theirs = peft.get_peft_model(tiny_lm_for(tok), cfg)
    ours = tiny_lm_for(tok)
    layer = inject_prompt_tuning(ours, n, text, tok)
    assert torch.equal(layer.prompt_embeddings.detach(), theirs.prompt_encoder["default"].embedding.weight.detach())
    assert torch.equal(text_init(ours.get_input_embeddings().embedding, tok, text, n), layer.prompt_embeddings.detach())
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(model_dir))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["prompt_tuning_init"], config["prompt_tuning_init_text"]) == ("TEXT", text)
    assert config["tokenizer_name_or_path"] == str(model_dir)
    again = peft.PeftModel.from_pretrained(tiny_lm_for(tok), tmp_path / "adapter")
    assert torch.equal(again.prompt_encoder["default"].embedding.weight.detach(), layer.prompt_embeddings.detach())


def test_random_init_is_peft_random_for_the_same_seed() -> None:
    base, model = tiny_model("llama"), tiny_model("llama")  # tiny_model seeds the generator itself
    torch.manual_seed(11)
    theirs = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6))
    torch.manual_seed(11)
    layer = inject_prompt_tuning(model, 6)
    assert torch.equal(layer.prompt_embeddings.detach(), theirs.prompt_encoder["default"].embedding.weight.detach())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.embed_tokens.prompt_embeddings"]


def test_bad_prompt_tuning_files_are_refused(tmp_path: Path) -> None:
    model = tiny_model("llama")
    inject_prompt_tuning(model, N)
    save_adapter(model, tmp_path / "a")
    with pytest.raises(LorakitError, match="already has prompt-tuning virtual tokens"):
        load_adapter(model, tmp_path / "a")
    with pytest.raises(LorakitError, match="64 wide but this model's embeddings are 32"):
        import transformers as tf

        load_adapter(tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=1, num_attention_heads=2)), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": 4}))
    with pytest.raises(LorakitError, match=r"prompt_embeddings has shape \(5, 64\), but adapter_config.json says 4"):
        load_adapter(tiny_model("llama"), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "task_type": "SEQ_2_SEQ_LM"}))
    with pytest.raises(LorakitError, match="task_type is 'SEQ_2_SEQ_LM'"):
        load_adapter(tiny_model("llama"), tmp_path / "a")
    with pytest.raises(LorakitError, match="has 5 virtual tokens"):
        model(input_ids=torch.tensor([[-6, 3, 4]]))


def test_merge_and_gguf_export_refuse_prompt_tuning(tmp_path: Path) -> None:
    from lorakit.export.gguf import export_gguf
    from lorakit.export.merge import AdapterRef, merge

    model = tiny_model("llama")
    inject_prompt_tuning(model, N)
    save_adapter(model, tmp_path / "pt", base_model_name_or_path="never-loaded")
    reason = "prompt-tuning adapter: its virtual tokens are extra inputs, not a change to any weight"
    with pytest.raises(LorakitError, match=reason):
        merge([AdapterRef(tmp_path / "pt")], tmp_path / "merged")
    with pytest.raises(LorakitError, match=reason):
        export_gguf(None, tmp_path / "m.gguf", adapter=tmp_path / "pt")
    with pytest.raises(LorakitError, match=reason):
        export_gguf(None, tmp_path / "a.gguf", adapter=tmp_path / "pt", adapter_only=True)
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob("*.gguf"))


def test_compare_scale_refuses_prompt_tuning(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lorakit.cli import app

    model = tiny_model("llama")
    inject_prompt_tuning(model, N)
    save_adapter(model, tmp_path / "pt")
    (tmp_path / "q.jsonl").write_text('{"prompt": "hi", "completion": "hello"}\n')
    result = CliRunner().invoke(app, ["compare", "--adapter", str(tmp_path / "pt"), "--data", str(tmp_path / "q.jsonl"),
                                      "--scale", "0.5,1"], env={"COLUMNS": "300"})
    assert isinstance(result.exception, LorakitError)  # the CLI's main() prints it as one line, exit 2
    assert "is a prompt-tuning adapter; its virtual tokens have no strength to scale" in str(result.exception)


def test_serve_refuses_prompt_tuning_at_start_up(tmp_path: Path) -> None:
    from lorakit.serve.multi_lora import check_servable

    model = tiny_model("llama")
    inject_prompt_tuning(model, N)
    save_adapter(model, tmp_path / "pt")
    with pytest.raises(LorakitError, match="serve does not take prompt-tuning adapters"):
        check_servable("pt", tmp_path / "pt")


def test_greedy_generation_equals_peft_generate(tmp_path: Path) -> None:
    from lorakit.eval.generate import GenerationSettings, InferenceModel, generate_answers, prompt_ids, stop_token_ids

    tok = tiny_tokenizer()
    ours = tiny_lm_for(tok)
    torch.manual_seed(2)
    inject_prompt_tuning(ours, 4)
    with torch.no_grad():  # N(0, 1) rows dwarf this model's embeddings; scale them so the answers vary by prompt
        prompt_embedding(ours).prompt_embeddings.mul_(0.2)
    ours.eval()
    save_adapter(ours, tmp_path / "pt")
    im = InferenceModel(ours, tok)
    prompts = ["hello world", "what is the capital of france? tell me more please"]
    settings = GenerationSettings(max_new_tokens=10)
    answers = generate_answers(im, prompts, settings, batch_size=2)  # one left-padded batch, KV cache
    theirs = peft.PeftModel.from_pretrained(tiny_lm_for(tok), tmp_path / "pt").eval()
    for prompt, answer in zip(prompts, answers):
        ids = torch.tensor([prompt_ids(InferenceModel(tiny_lm_for(tok), tok), prompt_text_of(im, prompt))])
        with torch.no_grad():
            out = theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                  do_sample=False, eos_token_id=stop_token_ids(im), pad_token_id=tok.pad_token_id)
        new = [t for t in out[0, ids.shape[1]:].tolist() if t not in stop_token_ids(im)]
        assert answer.text == tok.decode(new, skip_special_tokens=True).strip()
    assert len({a.text for a in answers}) == 2 and all(a.text for a in answers)


def prompt_text_of(im, prompt: str) -> str:
    from lorakit.eval.generate import prompt_text

    return prompt_text(prompt, im)


def test_adapter_info_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lorakit.cli import app

    model = tiny_model("llama")
    inject_prompt_tuning(model, N)
    save_adapter(model, tmp_path / "pt", base_model_name_or_path="tiny", meta={"method": "prompt_tuning"})
    info = adapter_info(tmp_path / "pt")
    assert (info.method, info.num_virtual_tokens, info.num_params) == ("prompt_tuning", N, N * 64)
    result = CliRunner().invoke(app, ["adapter", "info", str(tmp_path / "pt")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "virtual tokens 5" in result.output and "token dim      64" in result.output
    assert "parameters     320" in result.output and "init           RANDOM" in result.output


def test_config_checks_prompt_tuning_settings() -> None:
    from lorakit.config import load_config
    from lorakit.errors import ConfigError

    cfg = load_config(None, ["adapter.method=prompt_tuning", "adapter.num_virtual_tokens=8"])
    assert (cfg.adapter.method, cfg.adapter.num_virtual_tokens, cfg.adapter.prompt_tuning_init_text) == \
        ("prompt_tuning", 8, None)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["adapter.method=prompt_tuning", "adapter.num_virtual_tokens=0",
                           "adapter.prompt_tuning_init_text= "])
    assert "adapter.num_virtual_tokens: must be >= 1, got 0" in str(err.value)
    assert "adapter.prompt_tuning_init_text: is empty" in str(err.value)
    with pytest.raises(ConfigError, match="train.kl_to_base.weight: must be 0 with adapter.method prompt_tuning"):
        load_config(None, ["adapter.method=prompt_tuning", "train.kl_to_base.weight=0.5"])
