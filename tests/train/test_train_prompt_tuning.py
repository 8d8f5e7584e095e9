"""adapter.method prompt_tuning end to end: training (packed, shared prefix), resume, PEFT files, inference, NF4 base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from lorakit.config import load_config
from lorakit.train.loop import train
from tests.train.test_train_cli import chat_workspace, write_config

N = 8
INIT = "what comes after"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return chat_workspace(tmp_path_factory, "train-pt")


def pt_config(root: Path, name: str, quantization: dict | None = None, **train_overrides) -> Path:
    path = write_config(root, name, **{"lr": 0.1, "eval_every": 0, **train_overrides})
    cfg = yaml.safe_load(path.read_text())
    cfg["adapter"] = {"method": "prompt_tuning", "num_virtual_tokens": N, "prompt_tuning_init_text": INIT}
    cfg["data"].update(system_prompt="answer with the next word.", max_length=256)  # rows of several examples
    if quantization:
        cfg["quantization"] = quantization
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_prompt_tuning_trains_resumes_and_is_used_by_inference(workspace: Path) -> None:
    from lorakit.eval.generate import GenerationSettings, generate_answers, load_for_inference, stream_reply
    from lorakit.eval.runner import answer_perplexity, load_eval_set, text_perplexity

    first = train(load_config(pt_config(workspace, "pt", max_steps=16, save_every=8)), quiet=True)
    losses = first.losses
    assert sum(losses[12:]) < 0.8 * sum(losses[:4])
    run = workspace / "pt"
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"], config["prompt_tuning_init_text"]) == \
        ("PROMPT_TUNING", N, INIT)
    assert json.loads((run / "adapter" / "lorakit.json").read_text())["method"] == "prompt_tuning"
    assert list(load_file(str(run / "adapter" / "adapter_model.safetensors"))) == ["prompt_embeddings"]
    trainable = load_file(str(run / "checkpoints" / "step-16" / "trainable.safetensors"))
    assert list(trainable) == ["model.embed_tokens.prompt_embeddings"]
    assert (run / "checkpoints" / "step-16" / "adapter" / "adapter_config.json").exists()

    # Resume from step 8 (the newer checkpoint removed): steps 9-16 repeat the uninterrupted run.
    shutil.copytree(run, workspace / "pt-resumed")
    shutil.rmtree(workspace / "pt-resumed" / "checkpoints" / "step-16")
    resumed = train(load_config(pt_config(workspace, "pt-resumed", max_steps=16, save_every=8)), resume=True, quiet=True)
    for step, (got, want) in enumerate(zip(resumed.losses, losses[8:]), start=9):
        assert abs(got - want) <= 1e-6, (step, got, want)

    # Inference prepends the trained virtual tokens: generation, chat and perplexity see them.
    im = load_for_inference(None, run / "adapter", dtype="fp32")
    base = load_for_inference(str(workspace / "model"), None, dtype="fp32")
    evalset = load_eval_set(workspace / "train.jsonl", limit=4)
    settings = GenerationSettings(max_new_tokens=6)
    tuned = [a.text for a in generate_answers(im, evalset.prompts, settings)]
    assert tuned != [a.text for a in generate_answers(base, evalset.prompts, settings)]
    assert stream_reply(im, evalset.prompts[0], settings, lambda piece: None) == tuned[0]  # chat: HF generate
    text = "after red comes green. after blue comes fox."
    assert text_perplexity(im, text) != text_perplexity(base, text)
    assert answer_perplexity(im, evalset) < answer_perplexity(base, evalset)  # the tuned answers, with the virtual tokens


def test_prompt_tuning_on_an_nf4_base(workspace: Path) -> None:
    from lorakit.eval.generate import load_for_inference

    path = pt_config(workspace, "pt-nf4", {"method": "nf4", "compute_dtype": "fp32"}, max_steps=12, save_every=0)
    result = train(load_config(path), quiet=True)
    assert sum(result.losses[8:]) < 0.8 * sum(result.losses[:4])
    meta = json.loads((workspace / "pt-nf4" / "adapter" / "lorakit.json").read_text())
    assert meta["method"] == "prompt_tuning" and meta["quantization"]["method"] == "nf4"
    from lorakit.quant.linear import QuantizedLinear

    im = load_for_inference(None, workspace / "pt-nf4" / "adapter", dtype="fp32")  # back on the NF4 base it trained on
    assert any(isinstance(m, QuantizedLinear) for m in im.model.modules())
