"""From `DataConfig` to tokenized train / eval / test sets: load -> detect -> render -> tokenize.

Everything a user can get wrong in a data file surfaces here as a `DataError` naming the
file and row, before any model is trained. `build_datasets` is strict (an example whose
loss mask is empty after truncation would silently train nothing, so it is an error);
`collect` is the lenient version behind `lorakit data check`, which counts problems so
they can all be shown at once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lorakit.config import DataConfig
from lorakit.data.formats import detect_format, record_meta, to_example
from lorakit.data.packing import PackedSequence, pack_examples, real_token_fraction, shared_prefix_length
from lorakit.data.readers import Record, iter_records
from lorakit.data.templates import Rendered, control_strings, find_control, render, resolve_template
from lorakit.data.tokenize import TokenizedExample, tokenize_examples
from lorakit.data.virtual import with_virtual_tokens
from lorakit.errors import DataError, LorakitError

SPLITS = ("train", "eval", "test")
MAX_PROBLEMS = 20  # problem lines kept for the report


@dataclass
class DataStats:
    """Counts over all splits; `errors` > 0 means the data should not be trained on."""

    examples: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    trained_tokens: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    empty_mask: int = 0
    missing_eos: int = 0
    lengths: list[int] = field(default_factory=list)
    """Token length of every example before truncation, all splits."""
    max_length: int = 0
    real_token_fraction: float | None = None
    """Fill of the packed train rows (when packing is on)."""
    shared_prefix: int = 0
    """Tokens every train example starts with, stored once per packed row (data.share_prefix)."""
    packed_tokens: int | None = None
    """Tokens in the packed train rows: what one epoch processes (when packing is on)."""
    special_tokens: int = 0
    """Rows refused because their text contains a template control string or special token."""
    problems: list[str] = field(default_factory=list)
    """The first few error lines, each naming a file and row."""
    kinds: dict[str, int] = field(default_factory=dict)
    """Train examples per value of the rows' `kind` column (fact, refusal, replay, ...), in order of first use."""

    @property
    def errors(self) -> int:
        return self.empty_mask + self.special_tokens


@dataclass
class DataBundle:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    test: list[TokenizedExample]
    stats: DataStats
    packed: list[PackedSequence] | None = None
    """The train examples packed with stats.shared_prefix (when packing is on): packed once, for the
    statistics and for training."""


def build_datasets(cfg: DataConfig, tokenizer: Any, seed: int, virtual_tokens: int = 0) -> DataBundle:
    """Tokenized splits ready for `pack_examples` / `make_batches`; raises DataError on bad data.

    virtual_tokens=n (prompt tuning): every example starts with the n virtual tokens (data.virtual);
    data.max_length counts the text, so a packed row holds up to max_length + n tokens.
    """
    return collect(cfg, tokenizer, seed, strict=True, virtual_tokens=virtual_tokens)


def collect(cfg: DataConfig, tokenizer: Any, seed: int, strict: bool, virtual_tokens: int = 0) -> DataBundle:
    """`build_datasets`; with strict=False, empty loss masks are counted and dropped, not raised."""
    if not cfg.train_files:
        raise DataError("data.train is not set; give a JSONL/JSON/CSV/Parquet file (or a list of them)")
    stats = DataStats(max_length=cfg.max_length)
    cap = char_cap(tokenizer, cfg.max_length)  # once: it reads the whole vocabulary
    loaded = {name: load_file(getattr(cfg, name), cfg, tokenizer, stats, strict, cap)
              for name in SPLITS if name != "train" and getattr(cfg, name)}
    train = [ex for path in cfg.train_files for ex in load_file(path, cfg, tokenizer, stats, strict, cap)]
    held_out = {"eval": cfg.eval_ratio if "eval" not in loaded else 0.0,
                "test": cfg.test_ratio if "test" not in loaded else 0.0}
    parts = split_indices(len(train), held_out["eval"], held_out["test"], seed)
    splits = {name: with_virtual_tokens(loaded[name] if name in loaded and name != "train" else
                                        [train[i] for i in parts[name]], virtual_tokens)
              for name in SPLITS}
    if strict and not splits["train"]:
        raise DataError(f"{', '.join(cfg.train_files)}: no training examples left after holding out eval/test; "
                        "add rows or lower data.eval_ratio / data.test_ratio")
    for example in splits["train"]:
        kind = example.meta.get("kind")
        if kind is not None:
            stats.kinds[str(kind)] = stats.kinds.get(str(kind), 0) + 1
    for name, examples in splits.items():
        stats.examples[name] = len(examples)
        stats.tokens[name] = sum(len(x.input_ids) for x in examples)
        stats.trained_tokens[name] = sum(x.num_trained for x in examples)
    packed = None
    if cfg.packing:
        stats.shared_prefix = shared_prefix_length(splits["train"]) if cfg.share_prefix else 0
        packed = pack_examples(splits["train"], cfg.max_length + virtual_tokens, seed, stats.shared_prefix)
        stats.real_token_fraction = real_token_fraction(packed, cfg.max_length + virtual_tokens)
        stats.packed_tokens = sum(len(p.input_ids) for p in packed)
    return DataBundle(splits["train"], splits["eval"], splits["test"], stats, packed)


CHUNK_ROWS = 1024  # rows rendered and tokenized at a time: the raw rows of a large file are never all in memory


def load_file(path: str, cfg: DataConfig, tokenizer: Any, stats: DataStats, strict: bool,
              cap: int | None = None) -> list[TokenizedExample]:
    """One file's examples, tokenized; its problems are added to `stats`.

    The file is streamed: rows are read, rendered and tokenized CHUNK_ROWS at a time, and each
    rendered text is cut to `char_cap` characters first, so a megabyte row costs what
    `max_length` tokens of it can use, not a tokenization of the whole row.
    """
    rows = iter_records(path)
    head = list(itertools.islice(rows, 5))  # what format detection looks at
    template = resolve_template(cfg.template, tokenizer)
    file = _File(path, detect_format(head, path) if cfg.format == "auto" else cfg.format, template,
                 control_strings(template, tokenizer), cap or char_cap(tokenizer, cfg.max_length), strict)
    kept: list[TokenizedExample] = []
    numbered = enumerate(itertools.chain(head, rows), 1)
    while chunk := list(itertools.islice(numbered, CHUNK_ROWS)):
        kept += _load_chunk(chunk, file, cfg, tokenizer, stats)
    return kept


@dataclass(frozen=True)
class _File:
    """What every chunk of one file is read with."""

    path: str
    fmt: str
    template: str
    controls: Any
    cap: int
    strict: bool


def _load_chunk(chunk: list[tuple[int, Record]], file: _File, cfg: DataConfig, tokenizer: Any,
                stats: DataStats) -> list[TokenizedExample]:
    path, fmt, template, strict = file.path, file.fmt, file.template, file.strict
    rows, examples, rendered = [], [], []
    for row, record in chunk:
        example = to_example(record, fmt, row, path)
        found = find_control(example, file.controls)
        if found:
            problem = (f"{path} row {row}: the {found[0]} text contains {found[1]!r}, a special token of the "
                       f"{template} template or tokenizer; it would change the conversation and its loss mask, "
                       "so the row is refused: remove or reword it")
            stats.special_tokens += _problem(stats, problem, strict)
            continue
        try:
            rendered.append(cut_rendered(render(example, template, tokenizer, cfg.system_prompt), file.cap))
        except LorakitError as err:
            raise DataError(f"{path} row {row}: {err}") from err
        rows.append((row, record))
        examples.append(example)
    kept = []
    for (row, record), example, tok in zip(rows, examples, tokenize_examples(rendered, tokenizer, cfg.max_length)):
        tok.row, tok.source = row, str(path)
        if isinstance(example, str):
            tok.text, tok.meta = example, record_meta(record, fmt)
        else:
            tok.messages, tok.meta = example.messages, example.meta
        stats.lengths.append(len(tok.input_ids) + tok.cut)
        stats.truncated += tok.truncated
        stats.missing_eos += tok.missing_eos > 0
        if tok.num_trained == 0:
            problem = empty_mask_message(tok, cfg.max_length)
            stats.empty_mask += _problem(stats, problem, strict)
            continue
        kept.append(tok)
    return kept


def char_cap(tokenizer: Any, max_length: int) -> int:
    """Characters of a rendered row worth tokenizing when only its first `max_length` tokens are kept.

    No token of the vocabulary spells more characters than its longest entry (byte-level BPE and
    SentencePiece store one character per byte or character of text; added tokens are listed too),
    so `max_length` tokens never reach past max_length * longest characters. Twice that, and at
    least 32,768, leaves a wide margin for a tokenizer whose normaliser drops characters, and for
    the last word before the cut to tokenize as it would in the whole text.
    """
    longest = max((len(t) for t in tokenizer.get_vocab()), default=16)
    return max(32_768, 2 * max_length * max(longest, 1))


def cut_rendered(r: Rendered, cap: int) -> Rendered:
    """`r` with its text cut to `cap` characters and its trained spans clipped to the cut."""
    if len(r.text) <= cap:
        return r
    spans = [(s, min(e, cap)) for s, e in r.train_spans if s < cap]
    return Rendered(r.text[:cap], spans, r.eos)


def _problem(stats: DataStats, problem: str, strict: bool) -> int:
    """A bad row: raised when strict, else kept among the first MAX_PROBLEMS lines; returns 1 to count it."""
    if strict:
        raise DataError(problem)
    if len(stats.problems) < MAX_PROBLEMS:
        stats.problems.append(problem)
    return 1


def empty_mask_message(tok: TokenizedExample, max_length: int) -> str:
    where = f"{tok.source} row {tok.row}"
    if tok.truncated:
        return (f"{where}: no trained tokens left after truncation to max_length={max_length} (the example has "
                f"{len(tok.input_ids) + tok.cut} tokens and its answer starts past the limit); "
                "raise data.max_length or shorten the row")
    return f"{where}: no trained tokens (the answer renders to nothing trainable); check the row's answer"


def split_indices(n: int, eval_ratio: float, test_ratio: float, seed: int) -> dict[str, list[int]]:
    """Seeded train / eval / test index lists, each in file order."""
    def count(ratio: float) -> int:
        return 0 if ratio <= 0 or n < 2 else max(1, round(n * ratio))

    perm = np.random.default_rng(seed).permutation(n)
    n_eval, n_test = count(eval_ratio), count(test_ratio)
    return {"eval": sorted(perm[:n_eval].tolist()), "test": sorted(perm[n_eval : n_eval + n_test].tolist()),
            "train": sorted(perm[n_eval + n_test :].tolist())}
