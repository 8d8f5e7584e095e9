"""Malformed configs, data files, adapters and checkpoints fed to the CLI.

Each case must end in one-line `error:` messages (no traceback), a non-zero exit, and leave
every input file byte for byte as it was. Runs in-process through `lorakit.cli.main`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from lorakit import cli
from tests.conftest import save_tiny_model_dir
from tests.export.test_merge import make_adapter
from tests.train.test_train_cli import write_chat_data


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model, its adapter, chat data and a finished run with checkpoints: the good inputs."""
    root = tmp_path_factory.mktemp("fuzz")
    save_tiny_model_dir(root / "model")
    make_adapter(root / "model", root / "adapter", seed=1, meta={"template": "chatml", "base_model": "x"})
    write_chat_data(root / "train.jsonl", n=8)
    (root / "run.yaml").write_text(yaml.safe_dump(_config(root, root / "run")))
    code = _main("train", str(root / "run.yaml"), "--set", "train.max_steps=2", "--set", "train.save_every=1")[0]
    assert code == 0
    return root


def _config(root: Path, out: Path, **data) -> dict:
    return {"model": {"name": str(root / "model"), "dtype": "fp32"},
            "adapter": {"r": 2, "alpha": 4, "target_modules": ["q_proj"]},
            "data": {"train": str(root / "train.jsonl"), "max_length": 64, "eval_ratio": 0.0, **data},
            "train": {"max_steps": 1, "batch_size": 2, "precision": "fp32", "log_every": 1, "save_every": 0},
            "output_dir": str(out)}


def _main(*args: str) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.main(list(args))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, err.getvalue()


# --------------------------------------------------------------------------- cases
# Each case: (name, setup(ws) -> argv). `ws` is a fresh copy of the good inputs.

def _cfg_text(text: str) -> Callable[[Path], list[str]]:
    def setup(ws: Path) -> list[str]:
        (ws / "bad.yaml").write_bytes(text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text)
        return ["train", str(ws / "bad.yaml")]
    return setup


def _cfg_set(*sets: str, command: str = "train") -> Callable[[Path], list[str]]:
    def setup(ws: Path) -> list[str]:
        (ws / "c.yaml").write_text(yaml.safe_dump(_config(ws, ws / "out")))
        return [command, str(ws / "c.yaml"), *[a for s in sets for a in ("--set", s)]]
    return setup


def _data(name: str, content: bytes | str, command: str = "train", **data) -> Callable[[Path], list[str]]:
    def setup(ws: Path) -> list[str]:
        path = ws / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        (ws / "c.yaml").write_text(yaml.safe_dump(_config(ws, ws / "out", train=str(path), **data)))
        return [*(["data", "check"] if command == "data" else [command]), str(ws / "c.yaml")]
    return setup


def _adapter(damage: Callable[[Path], None], command: str = "info") -> Callable[[Path], list[str]]:
    def setup(ws: Path) -> list[str]:
        damage(ws / "adapter")
        a = str(ws / "adapter")
        return {"info": ["adapter", "info", a],
                "merge": ["merge", "--adapter", a, "--out", str(ws / "merged"), "--model", str(ws / "model")],
                "generate": ["generate", "--adapter", a, "--model", str(ws / "model"), "--prompt", "hi",
                             "--max-new-tokens", "2"]}[command]
    return setup


def _edit_json(name: str, **changes) -> Callable[[Path], None]:
    def damage(adapter: Path) -> None:
        path = adapter / name
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return damage


def _write(name: str, content: bytes) -> Callable[[Path], None]:
    return lambda adapter: (adapter / name).write_bytes(content)


def _truncate(name: str, keep: float = 0.5) -> Callable[[Path], None]:
    def damage(adapter: Path) -> None:
        data = (adapter / name).read_bytes()
        (adapter / name).write_bytes(data[: int(len(data) * keep)])
    return damage


def _header_size(n: int) -> Callable[[Path], None]:
    def damage(adapter: Path) -> None:
        data = (adapter / "adapter_model.safetensors").read_bytes()
        (adapter / "adapter_model.safetensors").write_bytes(struct.pack("<Q", n) + data[8:])
    return damage


def _checkpoints(damage: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def setup(ws: Path) -> list[str]:
        for step in (ws / "run" / "checkpoints").iterdir():
            damage(step)
        return ["train", str(ws / "run.yaml"), "--resume", "--set", "train.max_steps=3"]
    return setup


CASES: list[tuple[str, Callable[[Path], list[str]]]] = [
    # configs
    ("yaml syntax", _cfg_text("model: [unclosed\n")),
    ("yaml not a mapping", _cfg_text("- 1\n- 2\n")),
    ("yaml binary", _cfg_text("\udcff\udcfe\x00garbage")),
    ("yaml empty list section", _cfg_text("adapter: []\n")),
    ("yaml unknown key", _cfg_text("adapter:\n  rank: 4\n")),
    ("yaml int overflow", _cfg_text("adapter:\n  r: 1e400\n")),
    ("lr nan", _cfg_set("train.lr=nan")),
    ("epochs inf", _cfg_set("train.epochs=inf")),
    ("alpha -inf", _cfg_set("adapter.alpha=-.inf")),
    ("r string", _cfg_set("adapter.r=eight")),
    ("dropout 2", _cfg_set("adapter.dropout=2")),
    ("override without =", _cfg_set("train.lr")),
    ("override unknown section", _cfg_set("nope.x=1")),
    ("bad template", _cfg_set("data.template=vicuna", command="train")),
    ("bad target regex", _cfg_set("adapter.target_modules=['q_proj(']")),
    ("missing model", _cfg_set("model.name=runs/merged-does-not-exist")),
    ("missing data", _cfg_set("data.train=nowhere.jsonl")),
    # data files
    ("jsonl bad json", _data("d.jsonl", '{"messages": [\n')),
    ("jsonl not utf8", _data("d.jsonl", b'{"text": "\xff\xfe"}\n')),
    ("jsonl empty", _data("d.jsonl", "")),
    ("jsonl array rows", _data("d.jsonl", "[1, 2]\n")),
    ("jsonl unknown format", _data("d.jsonl", '{"foo": "bar"}\n')),
    ("json not a list", _data("d.json", '{"a": 1}')),
    ("csv extra cells", _data("d.csv", "prompt,completion\na,b,c\n")),
    ("csv unclosed quote", _data("d.csv", 'prompt,completion\n"abc,def\n')),
    ("parquet garbage", _data("d.parquet", b"PAR1 not really")),
    ("unknown suffix", _data("d.txt", "hello\n")),
    ("messages wrong shape", _data("d.jsonl", '{"messages": "hi"}\n')),
    ("messages bad role", _data("d.jsonl", '{"messages": [{"role": "wizard", "content": "x"}]}\n')),
    ("special token in user text", _data("d.jsonl", json.dumps({"messages": [
        {"role": "user", "content": "hi <|im_end|> there"}, {"role": "assistant", "content": "ok"}]}) + "\n")),
    ("special token, data check", _data("d.jsonl", json.dumps({"messages": [
        {"role": "user", "content": "hi [INST] there"}, {"role": "assistant", "content": "ok"}]}) + "\n",
        command="data", template="llama2")),
    ("answer past max_length", _data("d.jsonl", json.dumps({"prompt": "fox " * 200, "completion": "dog"}) + "\n")),
    # adapters
    ("adapter no config", _adapter(lambda a: (a / "adapter_config.json").unlink())),
    ("adapter config not json", _adapter(_write("adapter_config.json", b"{"))),
    ("adapter config binary", _adapter(_write("adapter_config.json", b"\xff\xfe\x00"))),
    ("adapter alpha NaN", _adapter(_edit_json("adapter_config.json", lora_alpha=float("nan")))),
    ("adapter alpha string", _adapter(_edit_json("adapter_config.json", lora_alpha="big"), "merge")),
    ("adapter bad alpha_pattern", _adapter(_edit_json("adapter_config.json", alpha_pattern={"q_proj(": 2}), "merge")),
    ("adapter rank_pattern 0", _adapter(_edit_json("adapter_config.json", rank_pattern={"q_proj": 0}))),
    ("adapter peft_type", _adapter(_edit_json("adapter_config.json", peft_type="IA3"))),
    ("adapter weights truncated", _adapter(_truncate("adapter_model.safetensors"))),
    ("adapter weights empty", _adapter(_write("adapter_model.safetensors", b""))),
    ("adapter header huge", _adapter(_header_size(2**60))),
    ("adapter header past end", _adapter(_header_size(10**6), "merge")),
    ("adapter weights missing", _adapter(lambda a: (a / "adapter_model.safetensors").unlink(), "generate")),
    ("lorakit.json truncated", _adapter(_truncate("lorakit.json"), "merge")),
    ("lorakit.json list", _adapter(_write("lorakit.json", b"[]"), "generate")),
    ("lorakit.json bad quantization", _adapter(_edit_json("lorakit.json", quantization={"method": "nf3"}), "merge")),
    # checkpoints
    ("checkpoints truncated", _checkpoints(lambda s: _truncate("trainable.safetensors")(s))),
    ("checkpoints state not json", _checkpoints(lambda s: (s / "trainer_state.json").write_text("{"))),
    ("checkpoints missing rng", _checkpoints(lambda s: (s / "rng.safetensors").unlink())),
    ("checkpoints state without step", _checkpoints(lambda s: (s / "trainer_state.json").write_text("{}"))),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.relative_to(root).parts[0].startswith("out")}


def test_there_are_enough_cases() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("name, setup", CASES, ids=[c[0] for c in CASES])
def test_malformed_input_gives_one_line_error(base: Path, tmp_path: Path, monkeypatch, name: str, setup) -> None:
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "out-cache"))
    monkeypatch.delenv("LORAKIT_DEBUG", raising=False)
    ws = tmp_path / "ws"
    shutil.copytree(base, ws)
    for yaml_file in ws.glob("*.yaml"):  # the copied run config points into the copy
        yaml_file.write_text(yaml_file.read_text().replace(str(base), str(ws)))
    argv = setup(ws)
    before = _snapshot(ws)
    code, err = _main(*argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0, f"{name}: exit 0\n{err}"
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors and all(line.startswith(("error: ", "warning: ", "converting ")) for line in lines), err
    assert code == 2 or "run with --debug" in errors[0], err
    assert _snapshot(ws) == before, f"{name}: an input file changed"
