"""lorakit.json: absent is a plain PEFT adapter; damaged is a one-line error, never read as {}."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit import cli
from lorakit.adapters import inject_lora
from lorakit.adapters.state import AdapterMeta, read_adapter_meta, save_adapter
from lorakit.errors import LorakitError
from tests.conftest import tiny_model

QLORA_META = {"base_model": "x", "quantization": {"method": "nf4", "blocksize": 64, "double_quant": True}}


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    model = tiny_model("llama")
    inject_lora(model, ["q_proj"], r=2, alpha=4)
    return save_adapter(model, tmp_path / "adapter", "some/base", meta=QLORA_META)


@pytest.mark.parametrize("content", [b"{\"quantization\": {\"method\": \"nf4\"", b"\xff\xfe", b"[1, 2]", b"null",
                                     b'{"quantization": "nf4"}', b'{"quantization": {"method": "nf5"}}',
                                     b'{"template": 3}', b'{"quantization": {"method": "nf4", "blocksize": 7}}'])
def test_damaged_lorakit_json_is_an_error(adapter: Path, content: bytes) -> None:
    (adapter / "lorakit.json").write_bytes(content)
    with pytest.raises(LorakitError, match="lorakit.json"):
        read_adapter_meta(adapter)


def test_absent_lorakit_json_is_a_plain_peft_adapter(adapter: Path) -> None:
    assert read_adapter_meta(adapter) == AdapterMeta(base_model="x", quantization=QLORA_META["quantization"])
    (adapter / "lorakit.json").unlink()
    assert read_adapter_meta(adapter) is None


def test_adapter_meta_round_trips_byte_for_byte(adapter: Path) -> None:
    """What training writes (its keys in its order, then a checkpoint's extras) reads back and writes unchanged."""
    written = {"lorakit_version": "0.1.0", "base_model": "some/base", "method": "qlora", "template": "chatml",
               "system_prompt": None, "max_length": 512,
               "quantization": {"method": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": "bfloat16"},
               "step": 40, "eval_loss": 1.25}
    model = tiny_model("llama")
    inject_lora(model, ["q_proj"], r=2, alpha=4)
    save_adapter(model, adapter, meta=written)
    raw = (adapter / "lorakit.json").read_bytes()
    assert raw == (json.dumps(written, indent=2) + "\n").encode()
    meta = read_adapter_meta(adapter)
    assert meta is not None and meta.max_length == 512 and meta.extra == {"step": 40, "eval_loss": 1.25}
    assert meta.to_dict() == written
    save_adapter(model, adapter, meta=meta)
    assert (adapter / "lorakit.json").read_bytes() == raw


def test_adapter_meta_quant_spec() -> None:
    import torch

    q = {"method": "nf4", "blocksize": 128, "double_quant": False, "compute_dtype": "bfloat16"}
    assert AdapterMeta().quant_spec() is None
    spec = AdapterMeta(quantization=q).quant_spec()
    assert (spec.method, spec.blocksize, spec.double_quant, spec.compute_dtype) == ("nf4", 128, False, torch.bfloat16)
    assert AdapterMeta(quantization={"method": "int8"}).quant_spec(torch.float32).compute_dtype == torch.float32


def test_writing_refuses_what_reading_would_refuse(tmp_path: Path) -> None:
    model = tiny_model("llama")
    inject_lora(model, ["q_proj"], r=2, alpha=4)
    with pytest.raises(LorakitError, match="quantization.method is 'nf5'"):
        save_adapter(model, tmp_path / "a", meta={"quantization": {"method": "nf5"}})
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("command", [["adapter", "info", "{a}"],
                                     ["merge", "--adapter", "{a}", "--out", "{out}", "--model", "{a}"],
                                     ["generate", "--adapter", "{a}", "--prompt", "hi", "--model", "{a}"]])
def test_cli_refuses_a_damaged_lorakit_json_in_one_line(adapter: Path, tmp_path: Path, command, capsys) -> None:
    (adapter / "lorakit.json").write_text('{"quantization": {"method": "nf4", "blocks')
    args = [c.format(a=adapter, out=tmp_path / "merged") for c in command]
    with pytest.raises(SystemExit) as exc:
        cli.main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "lorakit.json" in err, err
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("change, needle", [
    ({"lora_alpha": "NaN"}, "lora_alpha"),
    ({"lora_alpha": float("inf")}, "lora_alpha"),
    ({"lora_alpha": None}, "lora_alpha"),
    ({"r": 0}, "r is 0"),
    ({"lora_dropout": 2}, "lora_dropout"),
    ({"alpha_pattern": {"q_proj(": 4}}, "not a valid regex"),
    ({"alpha_pattern": {"q_proj": float("nan")}}, "alpha_pattern"),
    ({"alpha_pattern": {"q_proj": "x"}}, "alpha_pattern"),
    ({"rank_pattern": {"[": 4}}, "not a valid regex"),
    ({"rank_pattern": {"q_proj": -1}}, "rank_pattern"),
    ({"alpha_pattern": ["q_proj"]}, "expected a mapping"),
    ({"base_model_name_or_path": 7}, "base_model_name_or_path"),
])
def test_bad_adapter_config_values_are_one_line_errors(adapter: Path, change: dict, needle: str) -> None:
    from lorakit.adapters.state import read_adapter_config

    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))  # json writes NaN / Infinity
    with pytest.raises(LorakitError, match=needle) as exc:
        read_adapter_config(adapter)
    assert "\n" not in str(exc.value)


def test_nan_adapter_weights_are_refused_on_load(adapter: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from lorakit.adapters.state import read_adapter_weights

    path = adapter / "adapter_model.safetensors"
    weights = load_file(str(path))
    next(iter(weights.values()))[0, 0] = float("nan")
    save_file(weights, str(path))
    with pytest.raises(LorakitError, match="NaN/inf"):
        read_adapter_weights(adapter)
    assert torch.isnan(next(iter(load_file(str(path)).values()))).any()  # the user's file is untouched


@pytest.mark.parametrize("args", [["--adapter", "{a}:nan"], ["--adapter", "{a}", "--alpha", "nan"],
                                  ["--adapter", "{a}", "--scale", "inf"]])
def test_merge_refuses_non_finite_weights_alpha_scale(adapter: Path, tmp_path: Path, args, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["merge", "--out", str(tmp_path / "m"), *[a.format(a=adapter) for a in args]])
    assert exc.value.code == 2 and "finite" in capsys.readouterr().err
