"""Data pipeline: files -> conversations -> rendered text -> tokens + loss masks -> batches.

    build_datasets(cfg, tokenizer, seed)   load, detect format, render, tokenize, split
    pack_examples(examples, max_length, seed, shared_prefix)   whole examples packed into rows, no padding
    make_batches(items, batch_size, pad_id, seed, epoch)   seeded, padded tensor batches
    render / render_prompt   one code path for training text and inference prompts

Labels are aligned with input_ids (not shifted); the loss shifts them.
"""

from lorakit.data.batching import make_batches
from lorakit.data.dataset import DataBundle, DataStats, build_datasets
from lorakit.data.formats import Conversation, detect_format, load_records, to_example
from lorakit.data.packing import PackedSequence, pack_examples, real_token_fraction, shared_prefix_length
from lorakit.data.templates import Rendered, end_of_turn, render, render_prompt, resolve_template
from lorakit.data.tokenize import IGNORE, TokenizedExample, tokenize_example, tokenize_examples

__all__ = [
    "IGNORE", "Conversation", "DataBundle", "DataStats", "PackedSequence", "Rendered", "TokenizedExample",
    "build_datasets", "detect_format", "end_of_turn", "load_records", "make_batches", "pack_examples",
    "real_token_fraction", "render", "render_prompt", "resolve_template", "shared_prefix_length", "to_example",
    "tokenize_example", "tokenize_examples",
]
