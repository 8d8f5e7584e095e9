"""The `lorakit` command. Thin: each command parses its arguments and calls one library function.

User mistakes raise LorakitError; `main()` prints them as `error: ...` lines and exits 2,
without a traceback; any other exception is one line naming its type, exit 1. `--debug` (or
LORAKIT_DEBUG=1) shows the full traceback instead. Heavy imports (torch, transformers) happen
inside the commands so `lorakit --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from lorakit.config import DEFAULT_METRICS
from lorakit.errors import LorakitError
from lorakit.experiments.quant_cli import quantize_app

app = typer.Typer(
    help="Fine-tune language models on the machine you have: LoRA, QLoRA, full fine-tuning.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
adapter_app = typer.Typer(help="Inspect LoRA adapter directories.", no_args_is_help=True)
data_app = typer.Typer(help="Check datasets before training.", no_args_is_help=True)
config_app = typer.Typer(help="Check and print configs.", no_args_is_help=True)
export_app = typer.Typer(help="Export models to other formats.", no_args_is_help=True)
synth_app = typer.Typer(help="Training rows written by a model: from your documents (qa), or by the base model "
                         "itself against forgetting (replay, rewrite).",
                         no_args_is_help=True)
app.add_typer(adapter_app, name="adapter")
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(export_app, name="export")
app.add_typer(synth_app, name="synth")
app.add_typer(quantize_app, name="quantize")

ModelOptExport = Annotated[Optional[str], typer.Option("--model", help="Base model; default: the adapter's recorded base.")]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a config value: --set section.key=value (repeatable)."),
]


def _console():
    from rich.console import Console

    return Console()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="Builtin alias, model directory, .gguf file or hub id.")],
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model's own Python code.")] = False,
    quantization: Annotated[
        Optional[str],
        typer.Option("--quantization", help="nf4 or int8: load the model quantized and report measured bytes."),
    ] = None,
    blocksize: Annotated[int, typer.Option(help="NF4 block size (32, 64, 128, 256).")] = 64,
    double_quant: Annotated[bool, typer.Option(help="NF4: quantize the block scales too.")] = True,
) -> None:
    """Architecture, parameter count, LoRA-targetable layers and weight memory of a model."""
    from rich.table import Table
    from rich.text import Text

    from lorakit.models import describe_model

    mi = describe_model(model, trust_remote_code=trust_remote_code)
    console = _console()
    console.print(Text(f"{mi.name}  ({mi.source})", style="bold"))
    console.print(f"architecture   {mi.architecture} (model_type {mi.model_type})")
    console.print(f"parameters     {mi.num_params:,} ({mi.num_params / 1e6:.1f}M)")
    console.print(f"layers         {mi.num_layers}, hidden size {mi.hidden_size}, vocabulary {mi.vocab_size}")
    console.print(f"embeddings     {'tied to the output head' if mi.tied_embeddings else 'separate from the output head'}")
    console.print(f"LoRA targets   {mi.target_summary}")
    if mi.head_names:
        console.print(f"output head    {', '.join(mi.head_names)} (not in all-linear)")
    table = Table(title="weight memory", caption="int8 / nf4: linear layers quantized, the rest bf16")
    table.add_column("format")
    table.add_column("bytes", justify="right")
    table.add_column("size", justify="right")
    for fmt, nbytes in mi.weight_bytes.items():
        table.add_row(fmt, f"{nbytes:,}", human_bytes(nbytes))
    console.print(table)
    if quantization is not None:
        _print_quantized(console, model, quantization, blocksize, double_quant, trust_remote_code)


def _print_quantized(console, model: str, method: str, blocksize: int, double_quant: bool, trust_remote_code: bool) -> None:
    from rich.table import Table

    from lorakit.models.info import measure_quantized

    if method not in ("nf4", "int8"):
        raise LorakitError(f"--quantization {method!r} is not a method; use nf4 or int8")
    if method == "nf4" and blocksize not in (32, 64, 128, 256):
        raise LorakitError(f"--blocksize {blocksize} is not allowed; use 32, 64, 128 or 256")
    qs = measure_quantized(model, method, blocksize, double_quant, trust_remote_code)
    how = f"{method}" + (f", blocksize {blocksize}, double quant {'on' if double_quant else 'off'}" if method == "nf4" else "")
    table = Table(title=f"measured after loading with {how}",
                  caption=f"{qs.quantized_layers} linear layers quantized "
                          f"({'layer by layer' if qs.streamed else 'after a full-precision load'}); the rest in bf16")
    table.add_column("weights")
    table.add_column("parameters", justify="right")
    table.add_column("bf16", justify="right")
    table.add_column(method, justify="right")
    table.add_column("ratio", justify="right")
    table.add_row("quantized linears", f"{qs.quantized_params:,}", human_bytes(qs.before()),
                  human_bytes(qs.quantized_bytes), f"{qs.quantized_bytes / qs.before():.3f}x")
    table.add_row("everything else", f"{qs.other_params:,}", human_bytes(qs.other_bytes), human_bytes(qs.other_bytes), "1.000x")
    total_before, total_after = qs.before() + qs.other_bytes, qs.quantized_bytes + qs.other_bytes
    table.add_row("whole model", f"{qs.quantized_params + qs.other_params:,}", human_bytes(total_before),
                  human_bytes(total_after), f"{total_after / total_before:.3f}x")
    console.print(table)
    console.print(f"bits per quantized parameter: {qs.bits_per_param:.3f}")


@adapter_app.command("info")
def adapter_info_cmd(directory: Annotated[Path, typer.Argument(help="An adapter directory (LoRA, DoRA, IA3, prompt "
                                                                     "tuning) or a selective fine-tune.")]) -> None:
    """What an adapter holds: base model, method, rank / vectors / virtual tokens / tensors, targets, parameters, file size."""
    from rich.text import Text

    from lorakit.adapters.lora import lora_scaling
    from lorakit.adapters.methods import describe

    ai = describe(directory)
    console = _console()
    console.print(Text(f"{ai.path}", style="bold"))
    console.print(f"base model     {ai.base_model or 'unknown'}", markup=False)
    notes = {"dora": " (PEFT use_dora: magnitude + LoRA direction)", "ia3": " (PEFT IA3: learned scaling vectors)",
             "prompt_tuning": " (PEFT PROMPT_TUNING: trained virtual tokens)",
             "selective": " (lorakit's own format: base tensors replaced; PEFT has none for it)"}
    console.print(f"method         {ai.method}{notes.get(ai.method, '')}", markup=False)
    if ai.method == "prompt_tuning":
        console.print(f"virtual tokens {ai.num_virtual_tokens} (prepended to every sequence)")
        console.print(f"token dim      {ai.token_dim}")
        console.print(f"init           {'RANDOM' if ai.init_text is None else 'TEXT ' + repr(ai.init_text)}", markup=False)
    if ai.method in ("lora", "dora"):
        scaling = lora_scaling(ai.alpha, ai.r, ai.use_rslora)
        console.print(f"rank / alpha   r={ai.r}, alpha={ai.alpha:g}, scaling={scaling:g}{' (rsLoRA)' if ai.use_rslora else ''}")
        console.print(f"dropout        {ai.dropout:g}")
    if ai.method != "prompt_tuning":
        console.print(f"{'patterns' if ai.method == 'selective' else 'targets':<14} {ai.target_modules}", markup=False)
    if ai.method == "selective":
        console.print(f"tensors        {len(ai.modules)} replaced (e.g. {ai.modules[0]})", markup=False)
    elif ai.method != "prompt_tuning":
        console.print(f"modules        {len(ai.modules)} adapted layers")
    if ai.method == "ia3":
        console.print(f"feedforward    {len(ai.feedforward)} layers scale their input, "
                      f"{len(ai.modules) - len(ai.feedforward)} their output")
    console.print(f"parameters     {ai.num_params:,}")
    console.print(f"files          {human_bytes(ai.file_bytes)}")
    for key, value in (ai.meta.to_dict() if ai.meta else {}).items():
        if not isinstance(value, (dict, list)):
            console.print(f"{key:<14} {value}", markup=False)


@config_app.command("show")
def config_show(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config; defaults when omitted.")] = None,
    set_: SetOption = None,
) -> None:
    """Validate a config (reporting every problem) and print it fully resolved."""
    import yaml

    from lorakit.config import load_config, to_dict

    cfg = load_config(config, set_)
    typer.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config of the run.")],
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")] = False,
    nproc: Annotated[
        Optional[int],
        typer.Option("--nproc", help="Train with N processes on this machine (starts torchrun; see distributed: in the config)."),
    ] = None,
) -> None:
    """Fine-tune: writes config.yaml, metrics.jsonl, checkpoints/, adapter/ and eval.json to output_dir."""
    from lorakit.config import load_config
    from lorakit.train import distributed

    cfg = load_config(config, set_)  # config mistakes are reported once, before any process starts
    if cfg.task == "classification":
        from lorakit.classify.run import train_classifier

        train_classifier(cfg, _console(), nproc, resume)
        return
    if nproc is not None:
        argv = ["train", str(config), *[a for s in set_ or [] for a in ("--set", s)], *(["--resume"] if resume else [])]
        code = distributed.launch(nproc, argv)
        if code != 0:
            sys.stderr.write(f"error: the {nproc}-process job failed (torchrun exit code {code}); "
                             "the failing rank's error is above\n")
            raise typer.Exit(code)
        return
    from lorakit.train.loop import train as run_training

    with distributed.job():  # under torchrun: errors name their rank; the process group is left at the end
        run_training(cfg, resume=resume)


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="YAML config every trial starts from (its sweep: section may hold the grid).")],
    grid: Annotated[Optional[list[str]], typer.Option("--grid", help="KEY=V1,V2,...: values of one config key "
                                                      "(repeatable; trials are the cartesian product).")] = None,
    paired: Annotated[Optional[list[str]], typer.Option("--paired", help="K1,K2=a1:b1,a2:b2: keys that move "
                                                        "together, e.g. adapter.r,adapter.alpha=8:16,16:32.")] = None,
    metric: Annotated[Optional[str], typer.Option("--metric", help="What ranks the trials: eval_loss, fact, "
                                                  "retention, perplexity, ... (default eval_loss).")] = None,
    direction: Annotated[Optional[str], typer.Option("--direction", help="min, max or auto (min for losses and "
                                                     "perplexities).")] = None,
    parallel: Annotated[int, typer.Option("--parallel", help="Trials at once, as processes; cores split.")] = 1,
    out: Annotated[Optional[Path], typer.Option("--out", help="Sweep directory (default: output_dir-sweep).")] = None,
    search: Annotated[str, typer.Option("--search", help="grid, or optuna (TPE over --range and --grid).")] = "grid",
    trials: Annotated[int, typer.Option("--trials", help="--search optuna: how many trials.")] = 20,
    range_: Annotated[Optional[list[str]], typer.Option("--range", help="--search optuna: KEY=LOW:HIGH[:log].")] = None,
    seed: Annotated[int, typer.Option("--seed", help="--search optuna: the sampler's seed.")] = 0,
    eval_data: Annotated[Optional[list[str]], typer.Option("--eval-data", help="Questions each trial answers "
                                                           "(generation metrics; repeatable).")] = None,
    general: Annotated[Optional[str], typer.Option("--general", help="General questions: retention against the "
                                                   "base model.")] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="Plain text: perplexity (text_perplexity).")] = None,
    metrics: Annotated[str, typer.Option("--metrics", help="Generation metrics, comma-separated.")] = ",".join(
        DEFAULT_METRICS),
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Most tokens per answer.")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per generate call.")] = 8,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Run failed trials again.")] = False,
    set_: SetOption = None,
) -> None:
    """Train one run per trial of a grid (or an Optuna search) into SWEEP_DIR/trial-NNN; resumable;
    sweep.csv, sweep.json and sweep.html (ranked table, plots, heatmaps, facts/retention front)."""
    from lorakit.sweep.command import SweepOptions, run_sweep

    opts = SweepOptions(config, list(grid or []), list(paired or []), metric, direction, parallel, out, search,
                        trials, list(range_ or []), seed, list(eval_data or []), general, text,
                        [m for m in metrics.split(",") if m.strip()], max_new_tokens, batch_size, retry_failed,
                        list(set_ or []))
    run_sweep(opts, _console())


@data_app.command("check")
def data_check(
    config: Annotated[Path, typer.Argument(help="YAML config whose data section to check.")],
    set_: SetOption = None,
    examples: Annotated[int, typer.Option(help="How many rendered examples to show.")] = 3,
) -> None:
    """Render examples with the trained tokens highlighted and report counts and problems."""
    from lorakit.config import load_config
    from lorakit.data.check import check_data
    from lorakit.models import load_tokenizer

    cfg = load_config(config, set_)
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code, cfg.model.revision)
    stats = check_data(cfg.data, tokenizer, cfg.seed, _console(), num_examples=examples,
                       virtual_tokens=cfg.adapter.virtual_tokens)
    if getattr(stats, "errors", 0):
        raise LorakitError(f"{stats.errors} problem(s) in the data; see the report above")


@app.command()
def merge(
    adapter: Annotated[list[str], typer.Option("--adapter", help="Adapter directory, optionally DIR:WEIGHT (repeatable).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (a Hugging Face model).")],
    model: Annotated[Optional[str], typer.Option("--model", help="Base model; default: the adapter's recorded base.")] = None,
    alpha: Annotated[Optional[float], typer.Option("--alpha", help="Merge with this lora_alpha instead of the trained one.")] = None,
    scale: Annotated[Optional[float], typer.Option("--scale", help="Multiply the adapters' update by this (1 = as trained).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Stored dtype: bf16, fp16 or fp32 (merging is always fp32).")] = "bf16",
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check merged logits against base+adapter.")] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model's own Python code.")] = False,
) -> None:
    """Merge LoRA adapters into the base weights (fp32 math), verify, and write a Hugging Face model directory."""
    from lorakit.export.merge import merge as run_merge
    from lorakit.export.merge import parse_adapter_arg

    if alpha is not None and scale is not None:
        raise LorakitError("give --alpha or --scale, not both (--scale multiplies the update, --alpha replaces lora_alpha)")
    if any(v is not None and not (0 <= v < float("inf")) for v in (alpha, scale)):  # also refuses nan
        raise LorakitError("--alpha and --scale must be finite numbers >= 0")
    refs = [parse_adapter_arg(a) for a in adapter]
    result = run_merge(refs, out, model=model, alpha=alpha, scale=1.0 if scale is None else scale, dtype=dtype,
                       verify=verify, force=force, trust_remote_code=trust_remote_code)
    console = _console()
    console.print(f"merged {len(refs)} adapter(s) into {result.base_model}: {result.merged_layers} layers"
                  + (f", {result.dequantized_layers} quantized layers dequantized to full precision"
                     if result.dequantized_layers else ""), markup=False)
    v = result.verification
    if v is not None:
        console.print(f"verified: max |logit diff| {v.max_abs_diff:.3g} (largest logit {v.max_abs_logit:.3g}), "
                      f"top-1 agreement {100 * v.top1_agreement:.1f}%")
        if v.adapter_effect == 0.0:
            console.print("[yellow]warning: the adapters change nothing (their B matrices are zero?); "
                          "the merged model equals the base[/yellow]")
    console.print(f"wrote {result.out} ({result.dtype})", markup=False)


@export_app.command("gguf")
def export_gguf_cmd(
    out: Annotated[Path, typer.Option("--out", help="The .gguf file to write (an Ollama NAME.Modelfile goes beside it).")],
    model: ModelOptExport = None,
    adapter: Annotated[Optional[Path], typer.Option("--adapter", help="LoRA adapter to merge (fp32) before export.")] = None,
    type_: Annotated[str, typer.Option("--type", help="f16, bf16, q8_0, q4_0 (gguf package) or q4_k_m, q5_k_m, q6_k "
                                                       "(llama.cpp's llama-quantize); norms stay f32.")] = "f16",
    adapter_only: Annotated[bool, typer.Option("--adapter-only", help="Write the adapter alone as llama.cpp's LoRA "
                                                                      "GGUF (llama-cli --lora).")] = False,
    verify: Annotated[str, typer.Option("--verify", help="transformers (logits), llamacpp (llama.cpp's greedy answers "
                                                         "vs lorakit's) or none.")] = "transformers",
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Same as --verify none.")] = False,
    pre: Annotated[Optional[str], typer.Option("--pre", help="llama.cpp pre-tokenizer name, for a tokenizer llama.cpp "
                                                             "does not recognise by hash.")] = None,
    modelfile: Annotated[bool, typer.Option("--modelfile/--no-modelfile", help="Write NAME.Modelfile for Ollama.")] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model's own Python code.")] = False,
) -> None:
    """Write a GGUF file for llama.cpp and Ollama (Llama, Mistral, Qwen2 families), tokenizer and chat template included."""
    from lorakit.export.gguf import export_gguf

    result = export_gguf(model, out, adapter, type_, "none" if no_verify else verify, force, trust_remote_code,
                         adapter_only=adapter_only, pre=pre, modelfile=modelfile)
    console = _console()
    if getattr(result, "max_abs_diff", None) is not None:
        console.print(f"verified with transformers' GGUF loader: max |logit diff| {result.max_abs_diff:.3g} "
                      f"(largest logit {result.max_abs_logit:.3g}), top-1 agreement {100 * result.top1_agreement:.1f}%")
    if result.llamacpp_asked:
        console.print(f"verified with llama.cpp: {result.llamacpp_same} of {result.llamacpp_asked} greedy answers "
                      "identical to lorakit's", markup=False)
    if adapter_only:
        console.print(f"wrote {result.path} (LoRA GGUF for llama.cpp --lora: {result.layers} layers, r={result.rank}, "
                      f"alpha {result.alpha:g}, {result.tensor_type}, {human_bytes(result.bytes)})", markup=False)
        return
    if getattr(result, "quantize_s", None) is not None:
        console.print(f"quantized with llama.cpp's llama-quantize in {result.quantize_s:.1f} s", markup=False)
    console.print(f"wrote {result.path} ({result.arch}, {result.tensor_type}, {result.tensors} tensors, "
                  f"{human_bytes(result.bytes)})", markup=False)
    if modelfile:
        console.print(f"wrote {result.path.with_suffix('.Modelfile')} (ollama create NAME -f it)", markup=False)


def _generation_options(max_new_tokens: int, temperature: float, top_p: float, seed: int, stop: list[str] | None):
    from lorakit.eval.generate import GenerationSettings

    settings = GenerationSettings(max_new_tokens, temperature, top_p, seed, list(stop or []))
    settings.check()
    return settings


BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Prompts per generate call.")]
MaxLengthOpt = Annotated[int, typer.Option("--max-length", help="Tokens per sequence for perplexity.")]
TrustOpt = Annotated[bool, typer.Option(help="Allow the model's own Python code.")]
METRICS_DEFAULT = ",".join(DEFAULT_METRICS)
MaxNew = Annotated[int, typer.Option("--max-new-tokens", help="Most tokens to generate per answer.")]
Temperature = Annotated[float, typer.Option("--temperature", help="0 = greedy; > 0 samples.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (with --temperature > 0).")]
Seed = Annotated[int, typer.Option("--seed", help="Sampling seed.")]
Stop = Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string (repeatable); cut from the answer.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", help="Base model; default: the adapter's recorded base.")]
AdapterOpt = Annotated[Optional[Path], typer.Option("--adapter", help="LoRA adapter directory (PEFT format).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto, fp32, bf16 or fp16.")]


@app.command()
def generate(
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", help="A user message (repeatable).")] = None,
    file: Annotated[Optional[Path], typer.Option("--file", help="JSONL/JSON/CSV with prompt, messages or instruction.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write prompts and answers as JSONL.")] = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt (default: the adapter's).")] = None,
    max_new_tokens: MaxNew = 128,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Seed = 0,
    stop: Stop = None,
    batch_size: BatchSizeOpt = 8,
    dtype: DtypeOpt = "auto",
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model's own Python code.")] = False,
) -> None:
    """Answer prompts one-shot or from a file, with the chat template used in training."""
    import json

    from rich.text import Text

    from lorakit.data.formats import load_prompts
    from lorakit.eval.generate import generate as run_generate
    from lorakit.eval.generate import load_for_inference

    if (prompt is None) == (file is None):
        raise LorakitError("give --prompt TEXT (repeatable) or --file PROMPTS.jsonl, one of the two")
    if out is not None and out.exists():
        raise LorakitError(f"{out} already exists; choose another --out")
    settings = _generation_options(max_new_tokens, temperature, top_p, seed, stop)
    prompts = list(prompt) if prompt is not None else load_prompts(file)
    im = load_for_inference(model, adapter, dtype, trust_remote_code=trust_remote_code)
    answers = run_generate(im, prompts, settings, batch_size=batch_size, system_prompt=system)
    if out is not None:  # written before anything is printed: the answers survive a broken terminal
        from lorakit.io import atomic_write_text

        rows = [{"prompt" if isinstance(p, str) else "messages": p, "output": a} for p, a in zip(prompts, answers)]
        atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    console = _console()
    for p, a in zip(prompts, answers):
        shown = p if isinstance(p, str) else p[-1]["content"] if p else ""
        console.print(Text(f"> {shown}", style="bold"), highlight=False)  # user text: never markup
        console.print(a, highlight=False, markup=False)
    if out is not None:
        console.print(f"wrote {out}", highlight=False, markup=False)


@app.command()
def chat(
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt (default: the adapter's).")] = None,
    max_new_tokens: MaxNew = 256,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Seed = 0,
    stop: Stop = None,
    dtype: DtypeOpt = "auto",
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the model's own Python code.")] = False,
) -> None:
    """Chat in the terminal, answers streamed. /reset clears the history, /system TEXT sets it, /exit quits."""
    from lorakit.eval.chat import run_chat

    settings = _generation_options(max_new_tokens, temperature, top_p, seed, stop)
    run_chat(model, adapter, settings, system, dtype, trust_remote_code)


DataFiles = Annotated[Optional[list[Path]], typer.Option("--data", help="Questions with reference answers (repeatable).")]
MetricsOpt = Annotated[str, typer.Option("--metrics", help="Comma-separated: fact, exact_match, token_f1, refusal, label, "
                                                        "rouge1, rouge2, rougeL, bleu, chrf.")]
LimitOpt = Annotated[Optional[int], typer.Option("--limit", help="Only the first N rows of each file.")]
TextOpt = Annotated[Optional[Path], typer.Option("--text", help="Plain-text file: perplexity on general text.")]
RefusalOpt = Annotated[Optional[list[str]], typer.Option("--refusal", help="Refusal sentence (repeatable); default: "
                                                                          "\"I can't answer that from the handbook.\"")]
RefusalPatternOpt = Annotated[Optional[list[str]], typer.Option("--refusal-pattern", help="Refusal regex (repeatable).")]
PerplexityOpt = Annotated[bool, typer.Option("--perplexity/--no-perplexity", help="Perplexity on the answer tokens.")]


def _eval_options(data, metrics, max_new_tokens, batch_size, limit, perplexity, text, max_length, system, refusal,
                  refusal_pattern, dtype, trust_remote_code):
    from lorakit.eval.commands import EvalOptions
    from lorakit.eval.generate import GenerationSettings

    return EvalOptions(list(data or []), metrics.split(","), GenerationSettings(max_new_tokens), batch_size, limit,
                       perplexity, text, max_length, system, list(refusal or []), list(refusal_pattern or []), dtype,
                       trust_remote_code)


ClassifyConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", help="A task: classification config: the label set (data.train), prompt and columns for an untuned "
    "model.")]


@app.command("eval")
def eval_cmd(
    model: ModelOpt = None,
    adapter: AdapterOpt = None,
    data: DataFiles = None,
    metrics: MetricsOpt = METRICS_DEFAULT,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write metrics and every answer as JSON.")] = None,
    max_new_tokens: MaxNew = 64,
    batch_size: BatchSizeOpt = 8,
    limit: LimitOpt = None,
    perplexity: PerplexityOpt = True,
    text: TextOpt = None,
    max_length: MaxLengthOpt = 512,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt (default: the adapter's).")] = None,
    refusal: RefusalOpt = None,
    refusal_pattern: RefusalPatternOpt = None,
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    config: ClassifyConfigOpt = None,
) -> None:
    """Generate answers (greedy, the training template) and score them; perplexity on answers and text.
    Classifiers (task: classification; or --config for an untuned model): accuracy, macro-F1, per-class P/R, ECE."""
    from lorakit.classify.commands import is_classification, run_classification_eval
    from lorakit.eval.commands import run_eval_command

    if is_classification(model, [adapter] if adapter else [], config):
        run_classification_eval(model, [adapter] if adapter else [], list(data or []), config, out, batch_size, limit,
                                dtype, _console())
        return

    opts = _eval_options(data, metrics, max_new_tokens, batch_size, limit, perplexity, text, max_length, system,
                         refusal, refusal_pattern, dtype, trust_remote_code)
    run_eval_command(model, adapter, opts, out, _console())


@app.command()
def compare(
    model: ModelOpt = None,
    adapter: Annotated[Optional[list[Path]], typer.Option("--adapter", help="Adapter to compare (repeatable).")] = None,
    data: DataFiles = None,
    general: Annotated[Optional[Path], typer.Option("--general", help="General-knowledge questions: forgetting check.")] = None,
    metrics: MetricsOpt = METRICS_DEFAULT,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write compare.json (report.py renders it).")] = None,
    retention_threshold: Annotated[float, typer.Option("--retention-threshold", help="Warn when a tuned model keeps "
                                                       "fewer of the base's right general answers.")] = 0.9,
    perplexity_threshold: Annotated[float, typer.Option("--perplexity-threshold", help="Warn when general-text "
                                                        "perplexity rises by more than this fraction.")] = 0.1,
    scale: Annotated[Optional[str], typer.Option("--scale", help="Evaluate each adapter at these strengths, e.g. "
                                                 "0.5,0.75,1.0: the update times s, as `merge --scale` merges it.")] = None,
    max_new_tokens: MaxNew = 64,
    batch_size: BatchSizeOpt = 8,
    limit: LimitOpt = None,
    perplexity: PerplexityOpt = True,
    text: TextOpt = None,
    max_length: MaxLengthOpt = 512,
    system: Annotated[Optional[str], typer.Option("--system", help="System prompt for every model.")] = None,
    refusal: RefusalOpt = None,
    refusal_pattern: RefusalPatternOpt = None,
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    config: ClassifyConfigOpt = None,
) -> None:
    """The base model and each adapter on the same questions: metrics, wins and losses, forgetting."""
    from lorakit.classify.commands import is_classification, run_classification_eval
    from lorakit.eval.commands import run_compare_command

    if is_classification(model, list(adapter or []), config):
        run_classification_eval(model, list(adapter or []), list(data or []), config, out, batch_size, limit, dtype,
                                _console(), with_base=True)
        return

    opts = _eval_options(data, metrics, max_new_tokens, batch_size, limit, perplexity, text, max_length, system,
                         refusal, refusal_pattern, dtype, trust_remote_code)
    run_compare_command(model, list(adapter or []), opts, [general] if general else [], out, retention_threshold,
                        perplexity_threshold, _console(), scale)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def disagree(
    ctx: typer.Context,
    data: Annotated[Path, typer.Option("--data", help="Rows to label (JSONL/CSV/...; the text column).")],
    out: Annotated[Path, typer.Option("--out", help="The review queue (JSONL), most disagreement first.")],
    labels: Annotated[Optional[str], typer.Option("--labels", help="A gold label column: evaluate the queue "
                                                  "(error-capture curve).")] = None,
    html_out: Annotated[Optional[Path], typer.Option("--html", help="An offline HTML page: curve and queue.")] = None,
    config: ClassifyConfigOpt = None,
    batch_size: BatchSizeOpt = 8,
    limit: LimitOpt = None,
    dtype: DtypeOpt = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace --out / --html when they exist.")] = False,
) -> None:
    """--model A [--adapter DIR] --model B [--adapter DIR] ...: rank rows by the models' disagreement for review."""
    from lorakit.classify.queue import run_disagree

    run_disagree(list(ctx.args), data, out, labels, html_out, config, batch_size, limit, dtype, _console(), force)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (the output_dir of lorakit train).")],
) -> None:
    """(Re)write RUN_DIR/report.html: curves, metrics, before/after, samples, config; one file, viewable offline."""
    from lorakit.eval.report import write_report

    _console().print(f"wrote {write_report(run_dir)}", highlight=False, markup=False)


@app.command()
def demo(
    output_dir: Annotated[Optional[Path], typer.Option(help="Run directory (default: the config's output_dir, "
                                                       "or the next free name beside it).")] = None,
    config: Annotated[Path, typer.Option("--config", help="The demo's training config.")] = Path("examples/handbook/lora.yaml"),
    overrides: SetOption = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Evaluate on at most N questions per set.")] = None,
    merge: Annotated[bool, typer.Option("--merge/--no-merge", help="Merge and verify the adapter at the end.")] = True,
    reuse_base: Annotated[bool, typer.Option("--reuse-base", help="Reuse the base model's evaluation from an earlier "
                                             "demo with the same model, settings and eval files (kept beside the "
                                             "run directory in .demo-base/).")] = False,
) -> None:
    """The main job: evaluate SmolLM2, LoRA-train it on a handbook, evaluate again, merge; print before/after."""
    from lorakit.demo import run_demo

    run_demo(output_dir, config, overrides, limit, merge=merge, reuse_base=reuse_base)


ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing --out file.")]
SynthModelOpt = Annotated[Optional[str], typer.Option("--model", help="The model that writes (default: --config's).")]
SynthConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="The run's YAML config: its model, "
                                                        "data.template and data.system_prompt.")]
SynthSystemOpt = Annotated[Optional[str], typer.Option("--system", help="System prompt to answer under "
                                                       "(default: the adapter's, else none).")]
TemplateOpt = Annotated[Optional[str], typer.Option("--template", help="auto, tokenizer, chatml, llama2 or alpaca "
                                                    "(default: the config's, the adapter's, else auto).")]


def _model_choice(model, adapter, config, system, template, dtype, trust_remote_code):
    from lorakit.synth.run import ModelChoice

    return ModelChoice(model, adapter, config, system, template, dtype, trust_remote_code)


@synth_app.command("replay")
def synth_replay(
    out: Annotated[Path, typer.Option("--out", help="The JSONL file of replay rows to write.")],
    model: SynthModelOpt = None,
    adapter: AdapterOpt = None,
    prompts: Annotated[Optional[Path], typer.Option("--prompts", help="JSONL/JSON/CSV with a prompt column or chat "
                                                    "rows (last user turn); default: lorakit's general set.")] = None,
    system: SynthSystemOpt = None,
    config: SynthConfigOpt = None,
    template: TemplateOpt = None,
    max_new_tokens: MaxNew = 128,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N prompts.")] = None,
    batch_size: BatchSizeOpt = 32,
    dtype: DtypeOpt = "auto",
    force: ForceOpt = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """The model answers general prompts (greedy); each answer becomes a `kind: replay` training row."""
    from lorakit.synth.replay import GENERAL_PROMPTS, ReplayOptions, replay

    source = _model_choice(model, adapter, config, system, template, dtype, trust_remote_code)
    opts = ReplayOptions(source, prompts or GENERAL_PROMPTS, out, max_new_tokens, limit, batch_size, force)
    console = _console()
    console.print(replay(opts, console).summary(), highlight=False, soft_wrap=True)


@synth_app.command("rewrite")
def synth_rewrite(
    data: Annotated[Path, typer.Option("--data", help="Training rows (any chat format) with a fact column.")],
    out: Annotated[Path, typer.Option("--out", help="The JSONL file of rewritten rows to write.")],
    model: SynthModelOpt = None,
    adapter: AdapterOpt = None,
    config: SynthConfigOpt = None,
    system: SynthSystemOpt = None,
    template: TemplateOpt = None,
    fact_column: Annotated[str, typer.Option("--fact-column", help="Column with the fact a rewrite must keep.")] = "fact",
    refusal: RefusalOpt = None,
    max_new_tokens: MaxNew = 128,
    batch_size: BatchSizeOpt = 32,
    dtype: DtypeOpt = "auto",
    force: ForceOpt = False,
    trust_remote_code: TrustOpt = False,
) -> None:
    """SDFT: the model restates each answer in its own words; kept only where the row's fact survives."""
    from lorakit.synth.rewrite import RewriteOptions, rewrite

    source = _model_choice(model, adapter, config, system, template, dtype, trust_remote_code)
    opts = RewriteOptions(source, data, out, fact_column, list(refusal or []), max_new_tokens, batch_size, force)
    console = _console()
    console.print(rewrite(opts, console).summary(), highlight=False, soft_wrap=True)



@synth_app.command("qa")
def synth_qa(
    docs: Annotated[list[Path], typer.Argument(help="Documents (.txt .md .pdf .html .jsonl) or folders of them.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for train/heldout/unanswerable.jsonl, the report and "
                                      "the teacher cache (new, empty, or an earlier run's: it resumes).")],
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="A lorakit model as the teacher.")] = None,
    teacher_adapter: Annotated[Optional[Path], typer.Option("--teacher-adapter", help="LoRA adapter on --teacher.")] = None,
    teacher_url: Annotated[Optional[str], typer.Option("--teacher-url", help="OpenAI-compatible endpoint (.../v1).")] = None,
    teacher_model: Annotated[Optional[str], typer.Option("--teacher-model", help="The endpoint's model name.")] = None,
    api_key_env: Annotated[str, typer.Option("--api-key-env", help="Environment variable with the endpoint's key.")]
    = "OPENAI_API_KEY",
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML with a synth: section.")] = None,
    overrides: SetOption = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Only the first N windows.")] = None,
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
) -> None:
    """Question/answer training data from your documents, written by a teacher model window by window."""
    from lorakit.synth.qa import QAOptions, synth_qa as run_qa

    opts = QAOptions(list(docs), out, teacher, teacher_adapter, teacher_url, teacher_model, api_key_env, config,
                     list(overrides or []), limit, dtype, trust_remote_code)
    console = _console()
    console.print(run_qa(opts, console).summary(), highlight=False, soft_wrap=True)

_OOM_HINTS = {
    "train": "lower train.batch_size or data.max_length (raise train.grad_accum to keep the batch), "
             "or set train.gradient_checkpointing: true or adapter.method: qlora",
    "demo": "lower train.batch_size or data.max_length with --set, or pass --limit",
    "generate": "lower --batch-size or --max-new-tokens",
    "chat": "lower --max-new-tokens",
    "eval": "lower --batch-size or --max-length",
    "compare": "lower --batch-size or --max-length",
    "merge": "merge on a machine with more memory, or use --no-verify",
    "export": "export on a machine with more memory, or use --no-verify",
}


@app.command()
def serve(
    model: ModelOpt = None,
    adapter: Annotated[Optional[list[str]], typer.Option(
        "--adapter", help="NAME=DIR: serve the adapter in DIR as model NAME (repeatable).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML with a serve: section.")] = None,
    host: Annotated[Optional[str], typer.Option(help="Address to listen on (default 127.0.0.1).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Port (default 8000; 0 = any free port).")] = None,
    api_key_env: Annotated[Optional[str], typer.Option(
        "--api-key-env", help="Environment variable holding the API key (Authorization: Bearer).")] = None,
    max_batch: Annotated[Optional[int], typer.Option("--max-batch", help="Rows decoded together.")] = None,
    max_queue: Annotated[Optional[int], typer.Option("--max-queue", help="Waiting requests before 429.")] = None,
    max_prompt_tokens: Annotated[Optional[int], typer.Option("--max-prompt-tokens")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", help="Cap on a request's max_tokens.")] = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="Seconds per request.")] = None,
    grace: Annotated[Optional[float], typer.Option("--grace", help="Seconds to drain on SIGTERM.")] = None,
    allow_runtime_adapters: Annotated[Optional[bool], typer.Option(
        "--allow-runtime-adapters", help="Enable /v1/load_lora_adapter and /v1/unload_lora_adapter.")] = None,
    adapter_root: Annotated[Optional[Path], typer.Option(
        "--adapter-root", help="Runtime-loaded adapters must live under this directory.")] = None,
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
) -> None:
    """OpenAI-compatible server: the base model and every adapter, batched together; playground at /."""
    from lorakit.config import ServeConfig, from_dict, load_config, to_dict
    from lorakit.serve.engine import parse_adapter_args
    from lorakit.serve.server import serve as run_server

    base = to_dict(load_config(config).serve) if config is not None else {}
    given = dict(host=host, port=port, api_key_env=api_key_env, max_batch=max_batch, max_queue=max_queue,
                 max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, request_timeout_s=timeout, grace_s=grace,
                 allow_runtime_adapters=allow_runtime_adapters,
                 adapter_root=None if adapter_root is None else str(adapter_root))
    cfg = from_dict(ServeConfig, {**base, **{k: v for k, v in given.items() if v is not None}}, "serve.")
    adapters = parse_adapter_args(adapter or [])
    if model is None and not adapters:
        raise LorakitError("give --model M, --adapter NAME=DIR, or both")
    run_server(cfg, model, adapters, dtype, trust_remote_code=trust_remote_code)


def debug_enabled() -> bool:
    """--debug or LORAKIT_DEBUG=1: show full tracebacks instead of one-line errors."""
    return os.environ.get("LORAKIT_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Take --debug out of argv wherever it appears before a `--` (every command accepts it)."""
    end = argv.index("--") if "--" in argv else len(argv)
    rest = [a for a in argv[:end] if a != "--debug"] + argv[end:]
    return rest, len(rest) != len(argv)


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError):
        return True
    torch = sys.modules.get("torch")  # only loaded when a command needed it
    oom_type = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return (oom_type is not None and isinstance(err, oom_type)) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def _error_lines(err: BaseException, command: str) -> tuple[list[str], int]:
    """What the user sees for `err` without --debug, and the exit code."""
    if isinstance(err, LorakitError):
        return [f"error: {line}" for line in str(err).splitlines() or [type(err).__name__]], err.exit_code
    first = (str(err).strip().splitlines() or [""])[0][:300]
    if _is_oom(err):
        hint = _OOM_HINTS.get(command, "lower the batch size or sequence length")
        return [f"error: out of memory ({type(err).__name__}); {hint}"], 1
    what = f"{type(err).__name__}: {first}" if first else type(err).__name__
    return [f"error: {what} (this is a bug or an unexpected failure in lorakit; run with --debug for the traceback)"], 1


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks (also LORAKIT_DEBUG=1).")] = False,
) -> None:
    """--debug is taken out of the arguments by main(); declared here so --help lists it."""


def _with_tcmalloc() -> None:
    """Run this command again with tcmalloc preloaded where it is installed (lorakit.memory explains why;
    LORAKIT_ALLOCATOR=system keeps the system allocator). Returns only when the process stays as it is."""
    from lorakit.memory import allocator_env

    env = allocator_env(os.environ)
    if env is not None:
        try:
            os.execve(sys.executable, [sys.executable, "-m", "lorakit", *sys.argv[1:]], env)
        except OSError:
            return


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become `error:` lines and exit 2; anything else one line and exit 1.

    With --debug (anywhere before `--`) or LORAKIT_DEBUG=1 every error keeps its full traceback.
    """
    if argv is None:
        _with_tcmalloc()
    args, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    debug = debug or debug_enabled()
    previous = os.environ.get("LORAKIT_DEBUG")
    if debug:
        os.environ["LORAKIT_DEBUG"] = "1"  # torchrun children inherit it
    try:
        app(args=args, prog_name="lorakit")
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except Exception as err:  # noqa: BLE001 - every failure is shown: one line, or the traceback with --debug
        if debug:
            raise
        lines, code = _error_lines(err, next((a for a in args if not a.startswith("-")), ""))
        sys.stderr.write("".join(line + "\n" for line in lines))
        sys.exit(code)
    finally:  # an in-process caller (tests, the demo) keeps its environment
        if previous is None:
            os.environ.pop("LORAKIT_DEBUG", None)
        else:
            os.environ["LORAKIT_DEBUG"] = previous
