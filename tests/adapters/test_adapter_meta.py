"""lorakit.json: absent is a plain PEFT adapter; damaged is a one-line error, never read as {}."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit import cli
from lorakit.adapters import inject_lora
from lorakit.adapters.state import read_adapter_meta, save_adapter
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
    assert read_adapter_meta(adapter) == json.loads(json.dumps(QLORA_META))
    (adapter / "lorakit.json").unlink()
    assert read_adapter_meta(adapter) == {}


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
