"""`lorakit quantize report`: what each way of storing a model's weights costs and keeps.

For every setting (fp32, bf16, fp16, int8, NF4 and FP4 with and without double quantization,
at each blocksize) one fresh process loads the model that way and measures it
(experiments/quant_measure.py): stored bytes and bits per parameter, load peak RSS,
perplexity on the user's text in non-overlapping windows, next-token predictions, and greedy
generation speed. Here those results are joined: top-1 agreement with fp32's predictions on
the same windows, perplexity relative to fp32, then a terminal table, quant_report.json and
quant_report.html (perplexity against bits per parameter).

Quantized settings keep everything but the linear layers (embeddings, norms, the output head)
in bf16 and compute the matmuls in bf16, as lorakit's QLoRA loading does.

Every input is checked before the first model loads: an unknown method (with the closest
name), a blocksize quantization does not support, a missing model or text, a text shorter
than one window, outputs that already exist (without --force).
"""

from __future__ import annotations

import datetime as dt
import difflib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.experiments.quant_measure import BLOCKED, METHODS, Setting
from lorakit.quant.nf4 import BLOCKSIZES

REPORT_JSON = "quant_report.json"
REPORT_HTML = "quant_report.html"
DEFAULT_PROMPT = "Here is a short story about a lighthouse keeper and a storm:"
REFERENCE = Setting("fp32")  # the predictions every setting is compared with


@dataclass
class ReportOptions:
    model: str
    text: Path | None
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    blocksizes: list[int] = field(default_factory=lambda: [64])
    max_length: int = 512
    max_windows: int | None = None
    gen_tokens: int = 32
    out: Path = Path("quant_report")
    force: bool = False
    threads: int | None = None
    prompt: str = DEFAULT_PROMPT
    repeats: int = 1  # rounds over all settings, alternating; timings and RSS are medians over rounds


def parse_methods(text: str) -> list[str]:
    """'fp32,nf4-dq,nf4/32' -> ['fp32', 'nf4-dq', 'nf4/32']; an unknown name is an error naming the closest one.

    `method/blocksize` asks for that blocksize only; a blocked method without one takes every --blocksize.
    """
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    if not names:
        raise LorakitError(f"--methods is empty; give some of {','.join(METHODS)}")
    for name in names:
        method, _, size = name.partition("/")
        if method not in METHODS:
            close = difflib.get_close_matches(method, METHODS, n=1, cutoff=0.0)
            raise LorakitError(f"--methods: unknown method {method!r}; did you mean {close[0]!r}? "
                               f"(known: {', '.join(METHODS)})")
        if size and method not in BLOCKED:
            raise LorakitError(f"--methods: {name!r}: {method} has no blocksize; blocksizes apply to "
                               f"{', '.join(BLOCKED)}")
        if size:
            parse_blocksizes(size)
    return list(dict.fromkeys(names))


def parse_blocksizes(text: str) -> list[int]:
    """'32,64' -> [32, 64]; each must be a blocksize NF4/FP4 supports."""
    sizes = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if not part.isdigit() or int(part) not in BLOCKSIZES:
            raise LorakitError(f"--blocksize {part!r} is not supported; use some of {', '.join(map(str, BLOCKSIZES))} "
                               "(64 is the QLoRA default)")
        sizes.append(int(part))
    if not sizes:
        raise LorakitError(f"--blocksize is empty; give some of {', '.join(map(str, BLOCKSIZES))}")
    return list(dict.fromkeys(sizes))


def settings_for(methods: list[str], blocksizes: list[int]) -> list[Setting]:
    """fp32 first (the reference, added when not asked for), then each method at each blocksize it takes."""
    settings = [REFERENCE]
    for name in methods:
        method, _, size = name.partition("/")
        for blocksize in ([int(size)] if size else blocksizes if method in BLOCKED else [None]):
            settings.append(Setting(method, blocksize))
    return list(dict.fromkeys(settings))


def text_windows(ids: list[int], max_length: int, max_windows: int | None) -> list[list[int]]:
    """Non-overlapping full windows of `max_length` tokens from the start (a shorter tail is left out)."""
    windows = [ids[i : i + max_length] for i in range(0, len(ids) - max_length + 1, max_length)]
    return windows[:max_windows] if max_windows else windows


def check_options(opts: ReportOptions) -> list[Path]:
    """The cheap checks, before anything loads; returns the output paths."""
    if opts.text is None:
        raise LorakitError("give --text FILE: a plain-text file to measure perplexity and agreement on")
    if not opts.text.is_file():
        raise LorakitError(f"--text {opts.text} does not exist or is not a file; give a plain-text file")
    for name, value, least in (("--max-length", opts.max_length, 2), ("--gen-tokens", opts.gen_tokens, 1),
                               ("--max-windows", opts.max_windows, 1), ("--threads", opts.threads, 1),
                               ("--repeats", opts.repeats, 1)):
        if value is not None and value < least:
            raise LorakitError(f"{name} is {value}; it must be at least {least}")
    outputs = [opts.out / REPORT_JSON, opts.out / REPORT_HTML]
    if opts.out.exists() and not opts.out.is_dir():
        raise LorakitError(f"--out {opts.out} is a file; give a directory for {REPORT_JSON} and {REPORT_HTML}")
    existing = [p for p in outputs if p.exists()]
    if existing and not opts.force:
        raise LorakitError(f"{existing[0]} already exists; choose another --out or pass --force to replace it")
    return outputs


@dataclass
class Prepared:
    model_dir: str
    windows: list[list[int]]
    prompt: list[int]
    eos: int | None
    text_tokens: int
    text_sha256: str


def prepare(opts: ReportOptions) -> Prepared:
    """Resolve the model (converting a GGUF once, here), tokenize the text, cut it into windows."""
    from lorakit.models.load import load_tokenizer, model_directory, require_safetensors
    from lorakit.models.resolve import resolve_model

    source = resolve_model(opts.model)
    where = model_directory(source)
    require_safetensors(where, source.name)
    tokenizer = load_tokenizer(source)
    raw = opts.text.read_bytes()  # type: ignore[union-attr]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LorakitError(f"--text {opts.text} is not UTF-8 text (byte {err.start}); convert it to UTF-8") from None
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = text_windows(ids, opts.max_length, opts.max_windows)
    if not windows:
        raise LorakitError(f"--text {opts.text} has {len(ids)} tokens, shorter than one window of --max-length "
                           f"{opts.max_length}; give a longer text or a smaller --max-length")
    prompt = tokenizer(opts.prompt, add_special_tokens=False)["input_ids"]
    return Prepared(where, windows, prompt, tokenizer.eos_token_id, len(ids), hashlib.sha256(raw).hexdigest())


def run_setting(setting: Setting, prep: Prepared, opts: ReportOptions, work: Path) -> dict[str, Any]:
    """Measure one setting in a fresh Python process; a failure is recorded in the row, not raised."""
    job = {"model_dir": prep.model_dir, "method": setting.method, "blocksize": setting.blocksize,
           "windows": prep.windows, "prompt": prep.prompt, "eos": prep.eos, "gen_tokens": opts.gen_tokens,
           "threads": opts.threads}
    job_path, result_path = work / f"job-{setting.label.replace('/', '-')}.json", work / "result.json"
    job_path.write_text(json.dumps(job), encoding="utf-8")
    result_path.unlink(missing_ok=True)
    env = dict(os.environ)
    if opts.threads:
        env["OMP_NUM_THREADS"] = str(opts.threads)
    proc = subprocess.run([sys.executable, "-m", "lorakit.experiments.quant_measure", str(job_path), str(result_path)],
                          capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0 or not result_path.exists():
        lines = [line for line in (proc.stderr or "").strip().splitlines() if line.strip()]
        return {"setting": setting.label, "method": setting.method, "blocksize": setting.blocksize,
                "error": lines[-1] if lines else f"exit code {proc.returncode}"}
    return json.loads(result_path.read_text(encoding="utf-8"))


def agreement(predictions: list[list[int]], reference: list[list[int]]) -> float:
    """Fraction of positions whose argmax equals the reference's."""
    same = total = 0
    for p, r in zip(predictions, reference, strict=True):
        same += sum(a == b for a, b in zip(p, r, strict=True))
        total += len(r)
    return same / total


MEDIAN_KEYS = ("load_peak_rss_mb", "run_peak_rss_mb", "rss_before_load_mb", "load_s", "score_tokens_per_s",
               "gen_tokens_per_s")


def combine_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One setting's results from several rounds: the first round's numbers, with the timings and RSS
    replaced by their medians (each round's value kept in `<key>_rounds`); any failed round fails the row."""
    failed = next((r for r in rounds if "error" in r), None)
    if failed is not None or len(rounds) == 1:
        return failed or rounds[0]
    out = dict(rounds[0], repeats=len(rounds))
    for key in MEDIAN_KEYS:
        out[key] = statistics.median(r[key] for r in rounds)
        out[f"{key}_rounds"] = [r[key] for r in rounds]
    out["perplexity_rounds"] = [r["perplexity"] for r in rounds]  # deterministic: equal unless something is off
    return out


def finish_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add top-1 agreement and perplexity relative to fp32; drop the raw predictions."""
    ref = next((r for r in results if r["setting"] == REFERENCE.label and "error" not in r), None)
    rows = []
    for r in results:
        row = {k: v for k, v in r.items() if k not in ("predictions", "generated")}
        if ref is not None and "error" not in r:
            row["top1_agreement"] = agreement(r["predictions"], ref["predictions"])
            row["perplexity_vs_fp32"] = r["perplexity"] / ref["perplexity"] - 1
            row["generated_same_as_fp32"] = r["generated"] == ref["generated"]
        rows.append(row)
    return rows


def quant_report(opts: ReportOptions, console: Any = None) -> dict[str, Any]:
    """Run every setting, write quant_report.json and quant_report.html under opts.out, return the report."""
    import torch

    from lorakit import __version__
    from lorakit.experiments.quant_html import render_html
    from lorakit.io import atomic_write_text

    json_path, html_path = check_options(opts)
    settings = settings_for(opts.methods, opts.blocksizes)
    prep = prepare(opts)
    say = console.print if console is not None else (lambda *a, **k: None)
    say(f"{len(settings)} settings; {len(prep.windows)} windows of {opts.max_length} tokens "
        f"({len(prep.windows) * (opts.max_length - 1):,} scored) from {opts.text} ({prep.text_tokens:,} tokens)")
    rounds: dict[Setting, list[dict[str, Any]]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory(prefix="lorakit-quant-") as work:
        for r in range(opts.repeats):  # round after round over all settings: load drifts hit them alike
            for i, setting in enumerate(settings, 1):
                result = run_setting(setting, prep, opts, Path(work))
                rounds[setting].append(result)
                say(f"[{r * len(settings) + i}/{opts.repeats * len(settings)}] {setting.label}: " + (
                    f"error: {result['error']}" if "error" in result else
                    f"perplexity {result['perplexity']:.3f}, {result['linear_bits']:.3f} bits/param (linear), "
                    f"load peak RSS {result['load_peak_rss_mb']:.0f} MiB, {result['gen_tokens_per_s']:.1f} tokens/s"))
    results = [combine_rounds(rounds[s]) for s in settings]
    report = {
        "model": opts.model, "model_dir": prep.model_dir, "text": str(opts.text), "text_sha256": prep.text_sha256,
        "text_tokens": prep.text_tokens, "max_length": opts.max_length, "windows": len(prep.windows),
        "scored_tokens": sum(len(w) - 1 for w in prep.windows), "gen_tokens": opts.gen_tokens, "prompt": opts.prompt,
        "threads": opts.threads or torch.get_num_threads(), "compute_dtype_quantized": "bf16",
        "repeats": opts.repeats,
        "torch": torch.__version__, "lorakit": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "rows": finish_rows(results),
    }
    opts.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json_path, json.dumps(report, indent=1) + "\n")
    atomic_write_text(html_path, render_html(report))
    return report


def print_table(report: dict[str, Any], console: Any) -> None:
    """The report's rows as a terminal table."""
    from rich.table import Table

    table = Table(title=f"{report['model']}: {report['windows']} windows of {report['max_length']} tokens, "
                        f"{report['threads']} thread(s)",
                  caption="bits per parameter of the linear weights and of the whole model; load peak RSS; "
                          "perplexity and its change from fp32; top-1 agreement with fp32; greedy generation speed")
    for name in ("setting", "bits linear", "bits model", "peak MiB", "ppl", "vs fp32", "top-1", "tok/s"):
        table.add_column(name, justify="left" if name == "setting" else "right")
    for r in report["rows"]:
        if "error" in r:
            table.add_row(r["setting"], f"error: {r['error']}", *[""] * 6)
            continue
        vs = r.get("perplexity_vs_fp32")
        agree = r.get("top1_agreement")
        table.add_row(r["setting"], f"{r['linear_bits']:.3f}", f"{r['model_bits']:.3f}", f"{r['load_peak_rss_mb']:.0f}",
                      f"{r['perplexity']:.3f}", "" if vs is None else f"{100 * vs:+.2f}%",
                      "" if agree is None else f"{100 * agree:.2f}%", f"{r['gen_tokens_per_s']:.1f}")
    console.print(table)
