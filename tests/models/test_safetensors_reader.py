"""lorakit's own safetensors reader: header size capped, every entry bounds-checked against the file."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lorakit.errors import LorakitError
from lorakit.models.quantized import iter_tensors, read_header, safetensors_files


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)},
              str(path))
    return path


def _rewrite(path: Path, header: dict | bytes, n: int | None = None, data: bytes | None = None) -> None:
    raw = path.read_bytes()
    (old_n,) = struct.unpack("<Q", raw[:8])
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if n is None else n) + body
                     + (raw[8 + old_n:] if data is None else data))


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


def test_valid_file_reads(tmp_path: Path) -> None:
    tensors = dict(iter_tensors(_file(tmp_path)))
    assert torch.equal(tensors["a"], torch.arange(6, dtype=torch.float32).reshape(2, 3))


@pytest.mark.parametrize("damage", [
    lambda p, h: _rewrite(p, h, n=2**62),  # header size far past the cap
    lambda p, h: _rewrite(p, h, n=10_000),  # header size past the end of the file
    lambda p, h: p.write_bytes(p.read_bytes()[:-5]),  # truncated data
    lambda p, h: _rewrite(p, b"{not json" + b" " * 20),
    lambda p, h: _rewrite(p, b"[1, 2]"),
    lambda p, h: _rewrite(p, {**h, "a": {**h["a"], "data_offsets": [0, 10**9]}}),
    lambda p, h: _rewrite(p, {**h, "a": {**h["a"], "data_offsets": [8, 4]}}),
    lambda p, h: _rewrite(p, {**h, "a": {**h["a"], "shape": [1000, 1000]}}),
    lambda p, h: _rewrite(p, {**h, "a": {**h["a"], "shape": [-2, -3]}}),
    lambda p, h: _rewrite(p, {**h, "a": "x"}),
])
def test_damaged_header_is_a_one_line_error(tmp_path: Path, damage) -> None:
    path = _file(tmp_path)
    damage(path, _header(path))
    with pytest.raises(LorakitError, match="not a valid safetensors file") as exc:
        read_header(path)
    assert "\n" not in str(exc.value)


def test_index_cannot_point_outside_the_directory(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(LorakitError, match="not a file in"):
        safetensors_files(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("{")
    with pytest.raises(LorakitError, match="not a valid safetensors index"):
        safetensors_files(tmp_path)

