"""`lorakit data check`: show what will be trained before spending compute on it.

Most fine-tuning failures are data failures: a template that trains on the prompt, an
answer truncated away, a missing EOS that leaves the model rambling. This renders a few
examples with the trained tokens highlighted (token by token, after truncation, exactly
as the loss sees them) and reports counts, problems and the length distribution.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from lorakit.config import DataConfig
from lorakit.data.dataset import SPLITS, DataStats, collect
from lorakit.data.templates import render, resolve_template
from lorakit.data.tokenize import IGNORE, TokenizedExample, tokenize_example

TRAINED = "black on green"
UNTRAINED = "dim"
CUT = "red strike"


def check_data(cfg: DataConfig, tokenizer: Any, seed: int, console: Console, num_examples: int = 3,
               virtual_tokens: int = 0) -> DataStats:
    """Print examples and counts for `cfg`; `stats.errors` > 0 means the data needs fixing.

    virtual_tokens (prompt tuning): counted and packed as training will (the examples are shown as text).
    """
    bundle = collect(cfg, tokenizer, seed, strict=False, virtual_tokens=virtual_tokens)
    stats = bundle.stats
    template = resolve_template(cfg.template, tokenizer)
    console.print(f"template: [bold]{template}[/]   max_length: {cfg.max_length}   "
                  f"legend: [{TRAINED}]trained[/] [{UNTRAINED}]not trained[/] [{CUT}]cut by max_length[/]")
    for ex in bundle.train[:num_examples]:
        console.print(Panel(highlight(ex, template, tokenizer, cfg), title=Text(f"{ex.source} row {ex.row}"), expand=False))
    console.print(counts_table(stats))
    if stats.kinds:
        console.print(kinds_line(stats), highlight=False)
    _print_findings(stats, cfg, console)
    console.print(length_histogram(stats.lengths, cfg.max_length))
    return stats


def highlight(ex: TokenizedExample, template: str, tokenizer: Any, cfg: DataConfig) -> Text:
    """The example's text with each token styled by its label."""
    rendered = render(ex.messages if ex.messages is not None else ex.text or "", template, tokenizer,
                      cfg.system_prompt)
    labels = tokenize_example(rendered, tokenizer, cfg.max_length).labels
    offsets = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    out, cursor = Text(), 0
    for i, (start, end) in enumerate(offsets):
        start = max(start, cursor)  # byte-level pieces of one character share its offsets
        if end <= start:
            continue
        style = CUT if i >= len(labels) else TRAINED if labels[i] != IGNORE else UNTRAINED
        out.append(rendered.text[cursor:start], style=UNTRAINED)
        out.append(rendered.text[start:end], style=style)
        cursor = end
    out.append(rendered.text[cursor:], style=UNTRAINED)
    return out


def counts_table(stats: DataStats) -> Table:
    table = Table(title="examples per split")
    for column in ("split", "examples", "tokens", "trained tokens"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name in SPLITS:
        table.add_row(name, str(stats.examples.get(name, 0)), str(stats.tokens.get(name, 0)),
                      str(stats.trained_tokens.get(name, 0)))
    return table


def kinds_line(stats: DataStats) -> str:
    """Train examples per `kind` column value, e.g. "kinds: fact 264, refusal 59, replay 300"."""
    untagged = stats.examples.get("train", 0) - sum(stats.kinds.values())
    parts = [f"{kind} {n}" for kind, n in stats.kinds.items()] + ([f"no kind {untagged}"] if untagged > 0 else [])
    return "kinds: " + ", ".join(parts)


def _print_findings(stats: DataStats, cfg: DataConfig, console: Console) -> None:
    say = functools.partial(console.print, highlight=False)  # colours here carry meaning; no auto-colouring
    total = len(stats.lengths)
    say(f"truncated to max_length {cfg.max_length}: {stats.truncated} of {total}"
        + ("  [yellow](raise data.max_length to keep them whole)[/]" if stats.truncated else ""))
    style = "bold red" if stats.empty_mask else "green"
    say(f"[{style}]empty loss masks (nothing trained): {stats.empty_mask}[/]"
        + ("  [red]error: these examples cannot train[/]" if stats.empty_mask else ""))
    if stats.special_tokens:
        say(f"[bold red]rows refused for special tokens in their text: {stats.special_tokens}[/]  "
            "[red]error: remove them (lorakit never trains on a row whose text could open or close a turn)[/]")
    for problem in stats.problems:
        say(Text(f"  {problem}", style="red"))
    style = "yellow" if stats.missing_eos else "green"
    say(f"[{style}]examples with a trained answer not ending in EOS: {stats.missing_eos}[/]"
        + ("  (truncated answers, or an end-of-turn string that is not one token of this tokenizer; "
           "the model may not learn to stop)" if stats.missing_eos else ""))
    if stats.real_token_fraction is not None:
        say(f"packing: {stats.real_token_fraction:.1%} of packed train rows are real tokens")
        if stats.shared_prefix:
            say(f"shared prefix: the first {stats.shared_prefix} tokens of every example are stored once per "
                f"packed row; an epoch processes {stats.packed_tokens:,} tokens instead of "
                f"{stats.tokens.get('train', 0):,}")
    else:
        say("packing: off (data.packing: false)")


def length_histogram(lengths: list[int], max_length: int, bins: int = 10, width: int = 40) -> Text:
    """Text bars of the token-length distribution; bins past max_length (truncated) in red."""
    out = Text("token lengths before truncation\n", style="bold")
    if not lengths:
        return out
    top = max(max(lengths), max_length)
    edges = np.linspace(0, top, bins + 1).round().astype(int)
    counts, _ = np.histogram(lengths, bins=edges)
    peak = max(int(counts.max()), 1)
    for lo, hi, n in zip(edges[:-1], edges[1:], counts.tolist()):
        style = "red" if hi > max_length else "cyan"
        out.append(f"{lo:>6}-{hi:<6} ", style="dim")
        out.append("█" * max(int(round(width * n / peak)), 1 if n else 0), style=style)
        out.append(f" {n}\n")
    return out
