"""What a trial reports: the run's own numbers (eval.json) and, with question files, compare's evaluation.

With `--eval-data` each trial's adapter answers those questions (generation metrics and answer
perplexity, eval.compare.evaluate_model); with `--general` / `--text` the base model is evaluated
once (cached in the sweep directory) and each trial gets compare's forgetting check: answer
retention on the general questions and general-text perplexity. The trial's compare.json is
written into its run directory and its report.html rewritten, so each trial reads like `lorakit
compare` had been run on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.config import Config
from lorakit.errors import LorakitError

RUN_METRICS = {"eval_loss": "eval_loss", "eval_ppl": "eval_ppl", "best_eval_loss": "best_eval_loss",
               "train_loss": "train_loss_last", "train_s": "elapsed_s"}
"""Metric name -> its key in the run's eval.json."""
GENERAL = "general"
BASE_CACHE = "base_eval.json"


@dataclass
class Evaluation:
    """The evaluation after each trial (empty: the run's own numbers only)."""

    data: list[str] = field(default_factory=list)
    general: str | None = None
    text: str | None = None
    metrics: list[str] = field(default_factory=list)
    max_new_tokens: int = 64
    batch_size: int = 8

    @property
    def generates(self) -> bool:
        return bool(self.data or self.general)

    @property
    def needs_base(self) -> bool:
        return self.general is not None or self.text is not None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def options(self) -> Any:
        """compare's EvalOptions for these settings (checked: metrics known, files there)."""
        from lorakit.eval.commands import EvalOptions
        from lorakit.eval.generate import GenerationSettings

        opts = EvalOptions([Path(p) for p in self.data], list(self.metrics),
                           GenerationSettings(max_new_tokens=self.max_new_tokens), self.batch_size,
                           text=Path(self.text) if self.text else None)
        opts.check()
        return opts

    def sets(self) -> tuple[list[Any], Any]:
        """(the --eval-data sets, the general set or None), read and checked."""
        from lorakit.eval.commands import load_sets
        from lorakit.eval.runner import load_eval_set

        sets = load_sets([Path(p) for p in self.data], None) if self.data else []
        if any(s.name == GENERAL for s in sets) and self.general:
            raise LorakitError(f"--eval-data {self.data}: a file named {GENERAL}.* clashes with --general's set; "
                               "rename it")
        return sets, load_eval_set(self.general, GENERAL) if self.general else None

    def metric_names(self, cfg: Config) -> list[str]:
        """Every metric name a trial will report with this evaluation and config."""
        names = ["train_loss", "train_s"]
        if cfg.data.eval or cfg.data.eval_ratio > 0:  # an eval split: the run reports its eval loss
            names = ["eval_loss", "eval_ppl", "best_eval_loss", *names]
        if not self.generates and not self.text:
            return names
        sets, general = self.sets()
        for i, s in enumerate(sets):
            per_set = [*self.metrics, "perplexity"]
            names += [f"{s.name}.{m}" for m in per_set] + (per_set if i == 0 else [])
        if general is not None:
            names += ["retention", *(f"{GENERAL}.{m}" for m in self.metrics)]
        if self.text:
            names.append("text_perplexity")
        return names


def run_metrics(run_dir: Path) -> dict[str, Any]:
    """The run's eval.json numbers under the sweep's metric names."""
    summary = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    return {name: summary.get(key) for name, key in RUN_METRICS.items()}


def load_model(cfg: Config, run_dir: Path | None) -> Any:
    """The trained model of run_dir (adapter/ or a full fine-tune's model/), or the base model (None)."""
    from lorakit.eval.generate import load_for_inference

    trust = cfg.model.trust_remote_code
    if run_dir is not None and (run_dir / "adapter").is_dir():
        return load_for_inference(cfg.model.name, run_dir / "adapter", cfg.model.dtype, trust_remote_code=trust)
    name = str(run_dir / "model") if run_dir is not None else cfg.model.name
    im = load_for_inference(name, None, cfg.model.dtype, trust_remote_code=trust)
    im.template, im.system_prompt = cfg.data.template, cfg.data.system_prompt  # asked as training asked
    return im


def evaluate(ev: Evaluation, cfg: Config, run_dir: Path | None, label: str) -> Any:
    """compare's evaluate_model on every set (answer perplexity on the --eval-data sets) and the text."""
    from lorakit.eval.compare import evaluate_model

    opts = ev.options()
    sets, general = ev.sets()
    text = Path(ev.text).read_text(encoding="utf-8") if ev.text else None
    im = load_model(cfg, run_dir)
    return evaluate_model(im, label, [*sets, *([general] if general else [])], opts.metrics, opts.settings,
                          opts.batch_size, opts.refusal_matcher(), [s.name for s in sets], text, cfg.data.max_length)


def base_result(ev: Evaluation, cfg: Config, sweep_dir: Path) -> Any:
    """The base model's evaluation, once per sweep: kept in SWEEP_DIR/base_eval.json under a key of
    everything it depends on (model, template, prompts, settings, the bytes of every file)."""
    from lorakit.eval.compare import ModelResult
    from lorakit.io import atomic_write_text

    h = hashlib.sha256(json.dumps([cfg.model.name, cfg.model.dtype, cfg.data.template, cfg.data.system_prompt,
                                   cfg.data.max_length, ev.to_json()]).encode())
    for path in [*ev.data, *([ev.general] if ev.general else []), *([ev.text] if ev.text else [])]:
        h.update(Path(path).read_bytes())
    key, cache = h.hexdigest(), sweep_dir / BASE_CACHE
    if cache.is_file():
        stored = json.loads(cache.read_text(encoding="utf-8"))
        if stored.get("key") == key:
            return ModelResult(**stored["result"])
    result = evaluate(ev, cfg, None, "base")
    atomic_write_text(cache, json.dumps({"key": key, "result": dataclasses.asdict(result)}, ensure_ascii=False) + "\n")
    return result


def trial_metrics(ev: Evaluation, cfg: Config, run_dir: Path, base: Any) -> dict[str, Any]:
    """The trial's generation metrics (and, with a base result, retention and compare.json + report.html)."""
    tuned = evaluate(ev, cfg, run_dir, "tuned")
    out: dict[str, Any] = {}
    for i, (name, d) in enumerate(tuned.datasets.items()):
        for metric, value in d["metrics"].items():
            out[f"{name}.{metric}"] = value
            if i == 0 and name != GENERAL:
                out[metric] = value
    if tuned.text_perplexity is not None:
        out["text_perplexity"] = tuned.text_perplexity
    if base is not None:
        out.update(_compare(base, tuned, ev, run_dir))
    return {k: v for k, v in out.items() if not (isinstance(v, float) and not math.isfinite(v))}


def _compare(base: Any, tuned: Any, ev: Evaluation, run_dir: Path) -> dict[str, Any]:
    """compare.json in the run directory (the report shows it), and the forgetting check's retention."""
    from lorakit.eval.compare import build_comparison
    from lorakit.eval.report import write_report
    from lorakit.io import atomic_write_text

    comparison = build_comparison([base, tuned], GENERAL if ev.general else None)
    atomic_write_text(run_dir / "compare.json", json.dumps(comparison, indent=1, ensure_ascii=False) + "\n")
    write_report(run_dir)
    retention = (comparison["forgetting"].get("retention") or {}).get("tuned")
    return {"retention": retention} if ev.general else {}
