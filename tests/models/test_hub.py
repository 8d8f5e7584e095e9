"""Explicit hub access: hf:// ids, a missing local path is not a hub id, pinned commits, safetensors only.

The hub is played by a Hugging Face cache folder built here (HF_HUB_CACHE) with the hub's layout
(refs/main -> commit, snapshots/<commit>/...) and HF_HUB_OFFLINE=1: huggingface_hub resolves it
exactly as it resolves a model downloaded earlier, and nothing leaves the machine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.models import load_model, resolve_model
from lorakit.models.load import load_config
from tests.conftest import save_tiny_model_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch) -> Path:
    cache = tmp_path / "hf-cache"
    repo = cache / "models--acme--tiny-chat"
    save_tiny_model_dir(repo / "snapshots" / COMMIT)
    old = save_tiny_model_dir(repo / "snapshots" / OLD)
    with torch.no_grad():  # an older commit with other weights
        from safetensors.torch import load_file, save_file

        weights = load_file(old / "model.safetensors")
        save_file({k: v + 1.0 for k, v in weights.items()}, old / "model.safetensors", metadata={"format": "pt"})
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return repo


def test_hf_scheme_and_revision_parse() -> None:
    src = resolve_model("hf://acme/tiny-chat@v1.2")
    assert (src.kind, src.path, src.revision) == ("hub", "acme/tiny-chat", "v1.2")
    assert resolve_model("hf://acme/tiny-chat").revision is None
    for bad in ("hf://nope", "hf://a/b@", "hf://a/b@x y"):
        with pytest.raises(LorakitError, match="is not a hub model; write hf://owner/name"):
            resolve_model(bad)


def test_missing_local_path_is_not_a_hub_id(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(LorakitError, match=r"model path not found: runs/merged \(the folder runs/ is here.*hf://runs/merged"):
        resolve_model("runs/merged")
    assert resolve_model("hf://runs/merged").kind == "hub"  # said explicitly
    assert resolve_model("acme/tiny-chat").kind == "hub"  # no folder acme/ here: the user means the hub


def test_hub_model_loads_from_the_cache_and_records_its_commit(hub_cache: Path) -> None:
    loaded = load_model("acme/tiny-chat")
    assert loaded.revision == COMMIT and loaded.tokenizer is not None
    same = load_model(f"hf://acme/tiny-chat@{COMMIT}", with_tokenizer=False)
    old = load_model("acme/tiny-chat", revision=OLD, with_tokenizer=False)
    assert old.revision == OLD
    a, b, c = (next(m.model.parameters()) for m in (loaded, same, old))
    assert torch.equal(a, b) and torch.equal(a + 1.0, c)
    config, _ = load_config("hf://acme/tiny-chat")
    assert config.model_type == "llama"


def test_adapter_named_base_is_never_downloaded(hub_cache: Path) -> None:
    assert load_model("acme/tiny-chat", revision=COMMIT, with_tokenizer=False, cache_only=True).revision == COMMIT
    with pytest.raises(LorakitError, match=r"acme/other at abc.*not in the local Hugging Face cache.*--model hf://acme/other@abc"):
        load_model("acme/other", revision="abc", cache_only=True)
    with pytest.raises(LorakitError, match="not in the local cache"):
        load_model("acme/other")  # named by the user, but offline


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    folder = save_tiny_model_dir(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    shutil.copy(folder / "config.json", folder / "pytorch_model.bin")  # the name alone is enough
    with pytest.raises(LorakitError, match=r"only pickled weights \(pytorch_model.bin\); lorakit loads safetensors only"):
        load_model(str(folder))


def _adapter(tmp_path: Path, revision: str | None, base: str = "acme/tiny-chat") -> Path:
    from lorakit.adapters import inject_lora
    from lorakit.adapters.state import save_adapter

    model = load_model(base, revision=revision, with_tokenizer=False).model
    inject_lora(model, ["q_proj"], r=2, alpha=4)
    meta = {"template": "auto", "base_model": base, "base_model_revision": revision}
    return save_adapter(model, tmp_path / f"adapter-{revision}", base, meta)


def test_adapter_loads_on_the_commit_it_records(hub_cache: Path, tmp_path: Path) -> None:
    from lorakit.eval.generate import load_for_inference

    adapter = _adapter(tmp_path, OLD)
    im = load_for_inference(None, adapter, "fp32")  # the base named by the adapter, at its commit
    embed = im.model.get_input_embeddings().weight
    reference = load_model("acme/tiny-chat", revision=OLD, with_tokenizer=False).model.get_input_embeddings().weight
    assert torch.equal(embed, reference)


def test_adapter_named_hub_base_missing_from_the_cache_is_not_downloaded(hub_cache: Path, tmp_path: Path) -> None:
    from lorakit.adapters.state import base_model_of

    adapter = _adapter(tmp_path, COMMIT)
    config = adapter / "adapter_config.json"
    config.write_text(config.read_text().replace("acme/tiny-chat", "acme/elsewhere"))
    choice = base_model_of([adapter])
    assert (choice.name, choice.revision, choice.cache_only) == ("acme/elsewhere", COMMIT, True)
    from lorakit.eval.generate import load_for_inference

    with pytest.raises(LorakitError, match=rf"acme/elsewhere at {COMMIT} recorded in the adapter is not in the local"):
        load_for_inference(None, adapter, "fp32")
    named = base_model_of([adapter], "hf://acme/tiny-chat")
    assert named.cache_only is False  # the user named it: a download would be allowed


def test_damaged_revision_in_lorakit_json_is_one_line(tmp_path: Path, hub_cache: Path) -> None:
    import json

    from lorakit.adapters.state import read_adapter_meta

    adapter = _adapter(tmp_path, COMMIT)
    meta = json.loads((adapter / "lorakit.json").read_text())
    meta["base_model_revision"] = 7
    (adapter / "lorakit.json").write_text(json.dumps(meta))
    with pytest.raises(LorakitError, match="base_model_revision is 7, expected a commit string"):
        read_adapter_meta(adapter)


def test_training_records_the_hub_commit_and_generate_reuses_it(hub_cache: Path, tmp_path: Path) -> None:
    import json

    import yaml

    from lorakit.config import load_config
    from lorakit.train.loop import train
    from tests.train.test_train_cli import write_chat_data

    write_chat_data(tmp_path / "train.jsonl", n=8)
    run = tmp_path / "run"
    train(load_config(None, ["model.name=acme/tiny-chat", "model.dtype=fp32", f"data.train={tmp_path / 'train.jsonl'}",
                             "data.max_length=64", "data.eval_ratio=0", "train.max_steps=1", "train.batch_size=4",
                             "train.precision=fp32", "train.save_every=0", f"output_dir={run}"]), quiet=True)
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["revision"] == COMMIT
    assert json.loads((run / "adapter" / "lorakit.json").read_text())["base_model_revision"] == COMMIT
    from lorakit.adapters.state import base_model_of

    choice = base_model_of([run / "adapter"])
    assert (choice.name, choice.revision, choice.cache_only) == ("acme/tiny-chat", COMMIT, True)
