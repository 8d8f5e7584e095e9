"""What the synth commands share: the model that writes the rows, asked as the run will be trained,
and the JSONL file they go to (never overwritten without --force, written atomically)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.data.templates import TEMPLATES
from lorakit.errors import LorakitError


@dataclass
class ModelChoice:
    """The model that answers, and the template and system prompt it is asked in.

    Precedence: --template / --system, then --config's model and data section (the run the
    rows are for), then what the adapter recorded, then the tokenizer's template and no
    system prompt (what `lorakit generate` does).
    """

    model: str | None = None
    adapter: Path | None = None
    config: Path | None = None
    system: str | None = None
    template: str | None = None
    dtype: str = "auto"
    trust_remote_code: bool = False

    def check(self) -> None:
        if self.system is not None and self.config is not None:
            raise LorakitError("give --system or --config, not both (--config supplies the run's system prompt)")
        if self.template is not None and self.template not in ("auto", *TEMPLATES):
            raise LorakitError(f"--template {self.template!r} is not a template; use auto or one of {', '.join(TEMPLATES)}")
        if self.model is None and self.adapter is None and self.config is None:
            raise LorakitError("give --model (or --config, whose model.name is used)")

    def load(self) -> Any:
        """An InferenceModel with the template and system prompt set."""
        from lorakit.eval.generate import load_for_inference

        self.check()
        model, dtype, trust = self.model, self.dtype, self.trust_remote_code
        template, system = self.template, self.system
        if self.config is not None:
            from lorakit.config import load_config

            cfg = load_config(self.config)
            model = model or cfg.model.name
            dtype = dtype if dtype != "auto" else cfg.model.dtype
            trust = trust or cfg.model.trust_remote_code
            template = template or cfg.data.template
            system = cfg.data.system_prompt
        im = load_for_inference(model, self.adapter, dtype, trust_remote_code=trust)
        if template is not None:
            im.template = template
        if self.config is not None or self.system is not None:
            im.system_prompt = system
        return im


def check_out(out: Path, force: bool) -> None:
    """Refuse to replace a user's file without --force (checked before any model is loaded)."""
    if Path(out).exists() and not force:
        raise LorakitError(f"{out} already exists; choose another --out or pass --force to replace it")


def write_jsonl(out: Path, rows: Sequence[dict]) -> None:
    from lorakit.io import atomic_write_text

    atomic_write_text(Path(out), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextmanager
def progress(console: Any | None, total: int, label: str) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on `console` (advance by n), or nothing without a console."""
    if console is None:
        yield None
        return
    from lorakit.eval.commands import generation_progress

    with generation_progress(console, total, label) as advance:
        yield advance
