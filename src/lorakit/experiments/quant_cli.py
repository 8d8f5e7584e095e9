"""The `lorakit quantize` command group (registered by cli.py): `quantize report`.

Imports only typer at module level, so `lorakit --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

quantize_app = typer.Typer(help="What quantization costs: size, memory, perplexity, agreement, speed.",
                           no_args_is_help=True)


@quantize_app.command("report")
def report_cmd(
    model: Annotated[str, typer.Argument(help="Builtin alias, model directory, .gguf file or hub id.")],
    text: Annotated[Optional[Path], typer.Option("--text", help="Plain-text file for perplexity and agreement.")]
    = None,
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated: fp32,bf16,fp16,int8,nf4,nf4-dq,fp4,"
                                                           "fp4-dq (-dq: double quantization); "
                                                           "nf4/32 = that blocksize only.")]
    = "fp32,bf16,fp16,int8,nf4,nf4-dq,fp4,fp4-dq",
    blocksize: Annotated[str, typer.Option("--blocksize", help="Comma-separated NF4/FP4 blocksizes (32,64,128,256).")]
    = "64",
    max_length: Annotated[int, typer.Option("--max-length", help="Tokens per window.")] = 512,
    max_windows: Annotated[Optional[int], typer.Option("--max-windows", help="Use only the first K windows.")] = None,
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", help="Tokens to generate for the speed test.")] = 32,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads per setting (default: torch's).")]
    = None,
    out: Annotated[Path, typer.Option("--out", help="Directory for quant_report.json and .html.")]
    = Path("quant_report"),
    repeats: Annotated[int, typer.Option("--repeats", help="Rounds over all settings, alternating; timings and "
                                                             "RSS are the medians.")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing report in --out.")] = False,
) -> None:
    """Measure each quantization setting in a fresh process: bits per parameter, load peak RSS, perplexity,
    top-1 agreement with fp32, generation speed; writes quant_report.json and quant_report.html."""
    from rich.console import Console

    from lorakit.experiments.quant_report import (
        ReportOptions,
        parse_blocksizes,
        parse_methods,
        print_table,
        quant_report,
    )

    opts = ReportOptions(model, text, parse_methods(methods), parse_blocksizes(blocksize), max_length, max_windows,
                         gen_tokens, out, force, threads, repeats=repeats)
    console = Console()
    report = quant_report(opts, console)
    print_table(report, console)
    console.print(f"wrote {out / 'quant_report.json'} and {out / 'quant_report.html'}")
