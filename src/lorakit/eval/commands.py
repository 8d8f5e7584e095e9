"""`lorakit eval` and `lorakit compare`: load, evaluate, print tables, write JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from lorakit.adapters.inject import scale_lora
from lorakit.adapters.state import is_prompt_tuning, read_adapter_config
from rich.text import Text

from lorakit.errors import LorakitError
from lorakit.eval.compare import ModelResult, build_comparison, evaluate_model, wins_and_losses
from lorakit.eval.generate import GenerationSettings, InferenceModel, load_for_inference
from lorakit.eval.metrics import DEFAULT_REFUSAL, RefusalMatcher, check_metrics
from lorakit.eval.runner import EvalSet, load_eval_set
from lorakit.io import atomic_write_text

if TYPE_CHECKING:
    from lorakit.adapters.state import AdapterMeta, BaseChoice


@dataclass
class EvalOptions:
    data: list[Path]
    metrics: list[str]
    settings: GenerationSettings
    batch_size: int = 8
    limit: int | None = None
    perplexity: bool = True
    text: Path | None = None
    max_length: int = 512
    system: str | None = None
    refusal: list[str] = field(default_factory=list)
    refusal_patterns: list[str] = field(default_factory=list)
    dtype: str = "auto"
    trust_remote_code: bool = False

    def check(self) -> None:
        self.settings.check()
        self.metrics = check_metrics(self.metrics)
        if self.batch_size < 1:
            raise LorakitError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise LorakitError(f"--limit must be >= 1, got {self.limit}")
        if self.max_length < 8:
            raise LorakitError(f"--max-length must be >= 8, got {self.max_length}")
        if self.text is not None and not self.text.is_file():
            raise LorakitError(f"--text {self.text} is not a file; give a plain-text file for perplexity")

    def refusal_matcher(self) -> RefusalMatcher:
        return RefusalMatcher(self.refusal or [DEFAULT_REFUSAL], self.refusal_patterns)


def load_sets(paths: Sequence[Path], limit: int | None) -> list[EvalSet]:
    if not paths:
        raise LorakitError("give --data FILE (repeatable): questions with reference answers")
    sets, names = [], set()
    for path in paths:
        s = load_eval_set(path, limit=limit)
        name, k = s.name, 2
        while name in names:  # two files with one stem
            name, k = f"{s.name}-{k}", k + 1
        s.name = name
        names.add(name)
        sets.append(s)
    return sets


def adapter_label(adapter: Path, taken: set[str]) -> str:
    label = f"{adapter.parent.name}/{adapter.name}" if adapter.name in ("adapter", "adapter-best") else adapter.name
    return unique_label(label or str(adapter), taken)


def unique_label(label: str, taken: set[str]) -> str:
    base, k = label, 2
    while label in taken:
        label, k = f"{base}-{k}", k + 1
    taken.add(label)
    return label


def parse_scales(text: str) -> list[float]:
    """--scale "0.5,0.75,1.0" -> [0.5, 0.75, 1.0]: finite numbers > 0, ascending, each once."""
    values = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise LorakitError(f"--scale {text!r}: {part.strip()!r} is not a number; give comma-separated "
                               "strengths > 0, e.g. --scale 0.5,0.75,1.0") from None
        if not math.isfinite(value) or value <= 0:
            raise LorakitError(f"--scale {text!r}: {part.strip()} must be a finite number > 0 "
                               "(1 = the adapter as trained), e.g. --scale 0.5,0.75,1.0")
        values.append(value)
    return sorted(set(values))


@contextmanager
def generation_progress(console: Any, total: int, label: str) -> Iterator[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _load(model: str | BaseChoice | None, adapter: Path | None, opts: EvalOptions, like: AdapterMeta | None = None
          ) -> InferenceModel:
    """`like`: the template and system prompt to ask in (a base model is asked as its adapter was trained)."""
    im = load_for_inference(model, adapter, opts.dtype, trust_remote_code=opts.trust_remote_code)
    if like is not None:
        im.template = like.template or im.template
        im.system_prompt = like.system_prompt if like.system_prompt is not None else im.system_prompt
    if opts.system is not None:
        im.system_prompt = opts.system
    return im


def _evaluate(model: str | BaseChoice | None, adapter: Path | None, label: str, sets: list[EvalSet], opts: EvalOptions,
              text: str | None, console: Any, like: AdapterMeta | None = None) -> ModelResult:
    return _run(_load(model, adapter, opts, like), label, sets, opts, text, console)


def _run(im: InferenceModel, label: str, sets: list[EvalSet], opts: EvalOptions, text: str | None,
         console: Any) -> ModelResult:
    total = sum(len(s) for s in sets) * (2 if opts.perplexity else 1)  # generation, then the perplexity pass
    with generation_progress(console, total, f"evaluate {label}") as advance:
        return evaluate_model(im, label, sets, opts.metrics, opts.settings, opts.batch_size, opts.refusal_matcher(),
                              opts.perplexity, text, opts.max_length, advance)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return str(value)


def run_eval_command(model: str | None, adapter: Path | None, opts: EvalOptions, out: Path | None,
                     console: Any) -> dict[str, Any]:
    from rich.table import Table

    opts.check()
    if out is not None and out.exists():
        raise LorakitError(f"{out} already exists; choose another --out")
    sets = load_sets(opts.data, opts.limit)
    text = opts.text.read_text(encoding="utf-8") if opts.text else None
    label = "base" if adapter is None else adapter_label(adapter, set())
    result = _evaluate(model, adapter, label, sets, opts, text, console)
    report = {"model": model, "adapter": None if adapter is None else str(adapter), "label": label,
              "settings": vars(opts.settings), "datasets": result.datasets,
              "text": None if opts.text is None else str(opts.text), "text_perplexity": result.text_perplexity}
    if out is not None:  # before anything is printed about it
        atomic_write_text(out, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    table = Table(title=Text(f"lorakit eval: {label}"))
    table.add_column("metric")
    for s in sets:
        table.add_column(Text(f"{s.name} (n={len(s)})"), justify="right")
    metric_names = list(next(iter(result.datasets.values()))["metrics"])
    for metric in metric_names:
        table.add_row(metric, *[_fmt(result.datasets[s.name]["metrics"].get(metric)) for s in sets])
    console.print(table)
    if result.text_perplexity is not None:
        console.print(f"perplexity on {opts.text}: {result.text_perplexity:.3f}", markup=False)
    if out is not None:
        console.print(f"wrote {out}", markup=False)
    return report


def run_compare_command(model: str | None, adapters: list[Path], opts: EvalOptions, general: list[Path],
                        out: Path | None, retention_threshold: float, perplexity_threshold: float,
                        console: Any, scales: str | None = None) -> dict[str, Any]:
    """`scales` ("0.5,1"): each adapter is evaluated at each strength, loaded once and re-scaled in place."""
    opts.check()
    strengths = parse_scales(scales) if scales is not None else [1.0]
    if not adapters:
        raise LorakitError("give at least one --adapter DIR to compare with the base model")
    for adapter in adapters:
        if not (adapter / "adapter_config.json").is_file():
            raise LorakitError(f"--adapter {adapter} is not an adapter directory (no adapter_config.json)")
        if scales is not None and is_prompt_tuning(read_adapter_config(adapter)):
            raise LorakitError(f"--scale: {adapter} is a prompt-tuning adapter; its virtual tokens have no strength "
                               "to scale (compare it without --scale)")
    if not 0 < retention_threshold <= 1:
        raise LorakitError(f"--retention-threshold must be in (0, 1], got {retention_threshold}")
    if perplexity_threshold < 0:
        raise LorakitError(f"--perplexity-threshold must be >= 0, got {perplexity_threshold}")
    if out is not None and out.exists():
        raise LorakitError(f"{out} already exists; choose another --out")
    if len(general) > 1:
        raise LorakitError("give one --general FILE (general-knowledge questions for the forgetting check)")
    sets = load_sets(list(opts.data) + list(general), opts.limit)
    general_name = sets[-1].name if general else None
    text = opts.text.read_text(encoding="utf-8") if opts.text else None
    from lorakit.adapters.state import base_model_of

    base = base_model_of(adapters[:1], model)  # the base the first adapter records, at its commit, cached only
    if base is None:
        raise LorakitError("give --model (the adapter does not record its base model)")
    if scales is not None:
        from lorakit.adapters.methods import adapter_kind

        for adapter in adapters:
            if adapter_kind(adapter) != "lora":
                raise LorakitError(f"--scale multiplies a LoRA update; {adapter} is {adapter_kind(adapter)}, "
                                   "which has none to scale: compare it without --scale")
    results = [_evaluate(base, None, "base", sets, opts, text, console, adapter_meta(adapters[0]))]
    taken = {"base"}
    runs: dict[str, list[tuple[float, str]]] = {}
    for adapter in adapters:
        name = adapter_label(adapter, taken)
        im = _load(base, adapter, opts)
        scaled = []
        for scale in sorted(strengths, key=lambda s: s != 1.0):  # 1 first: the adapter exactly as loaded
            scale_lora(im.model, scale)  # the update times scale, as `lorakit merge --scale` merges it
            label = name if scale == 1.0 else unique_label(f"{name}@{scale:g}", taken)
            scaled.append((scale, _run(im, label, sets, opts, text, console)))
        del im
        results += [r for _, r in sorted(scaled, key=lambda x: x[0])]
        runs[name] = [(scale, r.label) for scale, r in sorted(scaled, key=lambda x: x[0])]
    comparison = build_comparison(results, general_name, retention_threshold, perplexity_threshold,
                                  runs if scales is not None else None)
    if out is not None:  # before anything is printed about it
        atomic_write_text(out, json.dumps(comparison, indent=1, ensure_ascii=False) + "\n")
    print_comparison(comparison, console)
    if out is not None:
        console.print(f"wrote {out}", markup=False)
    return comparison


def adapter_meta(adapter: Path) -> AdapterMeta | None:
    """The adapter's lorakit.json (template, system prompt, quantization), or None for a PEFT-made adapter."""
    from lorakit.adapters.state import read_adapter_meta

    return read_adapter_meta(adapter)


def print_comparison(comparison: dict[str, Any], console: Any, samples: int = 3) -> None:
    from rich.table import Table

    labels = comparison["labels"]
    for name, entry in comparison["datasets"].items():
        table = Table(title=Text(f"{name} (n={entry['n']})"))
        table.add_column("metric")
        for label in labels:
            table.add_column(Text(label), justify="right")
        for metric, values in entry["metrics"].items():
            table.add_row(metric, *[_fmt(values.get(label)) for label in labels])
        console.print(table)
        metric = entry.get("primary_metric")
        if metric is None or samples <= 0:
            continue
        base_view = {"examples": [{"scores": ex["scores"][labels[0]]} for ex in entry["examples"]]}
        for label in labels[1:]:
            tuned_view = {"examples": [{"scores": ex["scores"][label]} for ex in entry["examples"]]}
            wins, losses = wins_and_losses(base_view, tuned_view, metric, samples)
            for kind, picked in (("wins", wins), ("losses", losses)):
                if not picked:
                    continue
                console.print(Text(f"{label} vs {labels[0]}: biggest {kind} on {name} ({metric})", style="bold"))
                for i in picked:
                    ex = entry["examples"][i]
                    console.print(f"  Q: {ex['prompt']}", highlight=False, markup=False)
                    console.print(f"     {labels[0]}: {_short(ex['outputs'][labels[0]])}", highlight=False, markup=False)
                    console.print(f"     {label}: {_short(ex['outputs'][label])}", highlight=False, markup=False)
    forgetting = comparison.get("forgetting", {})
    if forgetting.get("retention"):
        for label, value in forgetting["retention"].items():
            console.print(f"answer retention on {forgetting['dataset']} ({forgetting['metric']}): {label} {_fmt(value)}",
                          markup=False)
    if forgetting.get("perplexity"):
        console.print("general text perplexity: " + ", ".join(f"{k} {_fmt(v)}" for k, v in forgetting["perplexity"].items()),
                      markup=False)
    for adapter, rows in (comparison.get("scales") or {}).items():
        console.print(scale_table(comparison, adapter, rows))
    for warning in forgetting.get("warnings", []):
        console.print(Text("warning: ", style="bold yellow") + Text(warning), highlight=False)


def scale_table(comparison: dict[str, Any], adapter: str, rows: list[dict[str, Any]]) -> Any:
    """One row per scale (scale 0: the base model): what each set's primary metric gained, what the
    general set kept (retention) and general-text perplexity."""
    from rich.table import Table

    forgetting = comparison.get("forgetting", {})
    general, base = forgetting.get("dataset"), comparison["labels"][0]
    base_row = {"scale": 0, "label": base, "retention": 1.0 if any(r["retention"] is not None for r in rows) else None,
                "perplexity": (forgetting.get("perplexity") or {}).get(base),
                "metrics": {name: {m: v.get(base) for m, v in d["metrics"].items()}
                            for name, d in comparison["datasets"].items()}}
    primary = [(name, d["primary_metric"]) for name, d in comparison["datasets"].items()
               if name != general and d["primary_metric"]]
    columns = [(f"{name}: {metric}", lambda r, n=name, m=metric: r["metrics"][n].get(m)) for name, metric in primary]
    if general is not None:
        columns.append((f"{general}: retention", lambda r: r["retention"]))
        if "perplexity" in comparison["datasets"][general]["metrics"]:
            columns.append((f"{general}: perplexity", lambda r: r["metrics"][general].get("perplexity")))
    if any(r["perplexity"] is not None for r in rows):
        columns.append(("text perplexity", lambda r: r["perplexity"]))
    table = Table(title=f"adapter strength: {adapter} (scale 0 = {base})")
    table.add_column("scale", justify="right")
    for head, _ in columns:
        table.add_column(head, justify="right")
    for row in [base_row, *rows]:
        table.add_row(f"{row['scale']:g}", *[_fmt(get(row)) for _, get in columns])
    return table


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
