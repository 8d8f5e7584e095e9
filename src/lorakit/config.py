"""Typed configuration: dataclasses are the single source of truth for YAML and CLI.

A config is a tree of dataclasses. `load_config(path, overrides)` reads YAML, applies
`--set section.key=value` overrides, checks every key against the dataclass fields
(unknown keys get the closest valid name), checks types, then calls each section's
`check()` for value ranges. All problems are collected and raised together in one
`ConfigError`, one line per problem, each with its key path.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from lorakit.errors import ConfigError

Dtype = Literal["auto", "fp32", "bf16", "fp16"]
AnchorOn = Literal["replay", "non_target", "all"]

# The generation metrics by name (computed in eval.metrics), here so configs are checked without eval.
METRICS: dict[str, str] = {
    "exact_match": "normalised answer equals the reference",
    "token_f1": "token F1 against the reference (SQuAD)",
    "fact": "the row's `fact` string appears in the answer",
    "refusal": "the answer is a refusal (configured sentence or pattern)",
    "label": "the answer is the row's `label`",
    "rouge1": "ROUGE-1 F against the reference",
    "rouge2": "ROUGE-2 F against the reference",
    "rougeL": "ROUGE-L F against the reference",
    "bleu": "sacreBLEU against the reference (0-100, corpus)",
    "chrf": "chrF against the reference (0-100, corpus)",
}
DEFAULT_REFUSAL = "I can't answer that from the handbook."
"""The refusal sentence of the demo's data: what `refusal` looks for and `synth qa` answers by default."""
DEFAULT_METRICS = ["fact", "exact_match", "token_f1", "rougeL", "bleu", "chrf", "refusal"]
"""`lorakit eval` / `compare`'s --metrics default."""


@dataclass
class ModelConfig:
    """Which base model to load and how."""

    name: str = "smollm2-135m-instruct"
    """Builtin alias, local Hugging Face directory, `.gguf` file, or hub id."""
    dtype: Dtype = "auto"
    """Weight dtype: auto = bf16 where the device computes it fast, else fp32."""
    trust_remote_code: bool = False
    revision: str | None = None

    def check(self) -> list[tuple[str, str]]:
        if not self.name.strip():
            return [("name", "is empty; give a model name, directory, .gguf file or hub id")]
        return []


@dataclass
class AdapterConfig:
    """What to train: LoRA adapters on a frozen base, or all weights."""

    method: Literal["lora", "qlora", "dora", "ia3", "selective", "full", "prompt_tuning"] = "lora"
    """lora: adapters on a frozen base; qlora: the same on a 4-bit (NF4) base, see `quantization`;
    dora: DoRA (a trained magnitude per output plus LoRA on the direction; with quantization.method nf4
    it is QDoRA); ia3: IA3 scaling vectors (all-linear = PEFT's layers for the architecture);
    selective: the base parameters `trainable` names train; full: every weight trains (for comparison);
    prompt_tuning: num_virtual_tokens trained embeddings in front of every sequence, the whole model
    frozen (Lester et al. 2021; PEFT's PROMPT_TUNING)."""
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names (exact or suffix), regexes (fullmatch), or "all-linear"."""
    use_rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    feedforward_modules: list[str] | None = None
    """ia3: the targets that scale their input (PEFT's feedforward_modules); None = PEFT's per architecture."""
    trainable: list[str] = field(default_factory=list)
    """selective: regexes (re.search) over full parameter names; exactly the matching parameters train."""
    num_virtual_tokens: int = 20
    """prompt_tuning: how many trained virtual tokens every sequence starts with."""
    prompt_tuning_init_text: str | None = None
    """prompt_tuning: start from this text's token embeddings (PEFT's TEXT init), repeated or cut to
    num_virtual_tokens; None = PEFT's RANDOM init, N(0, 1)."""

    @property
    def virtual_tokens(self) -> int:
        """Prompt tuning's virtual tokens in front of every sequence (0 for every other method)."""
        return self.num_virtual_tokens if self.method == "prompt_tuning" else 0

    def check(self) -> list[tuple[str, str]]:
        problems = selective_problems(self.method, self.trainable)
        if self.num_virtual_tokens < 1:
            problems.append(("num_virtual_tokens", f"must be >= 1, got {self.num_virtual_tokens}"))
        if self.prompt_tuning_init_text is not None and not self.prompt_tuning_init_text.strip():
            problems.append(("prompt_tuning_init_text", "is empty; give a text, or leave it unset for random init"))
        if self.r <= 0:
            problems.append(("r", f"must be > 0, got {self.r}"))
        if self.alpha <= 0:
            problems.append(("alpha", f"must be > 0, got {self.alpha}"))
        if not 0.0 <= self.dropout < 1.0:
            problems.append(("dropout", f"must be in [0, 1), got {self.dropout}"))
        if not self.target_modules:
            problems.append(("target_modules", 'is empty; use "all-linear" or a list of module names'))
        return problems


def selective_problems(method: str, trainable: list[str]) -> list[tuple[str, str]]:
    """adapter.trainable: given exactly when method is selective, each entry a valid regex."""
    if method != "selective":
        return [("trainable", f"is set but adapter.method is {method}; use adapter.method: selective")] if trainable else []
    if not trainable:
        return [("trainable", r"is empty; list regexes of the parameters to train, e.g. ['\.bias$'] (BitFit)")]
    problems = []
    for pattern in trainable:
        try:
            re.compile(pattern)
        except re.error as err:
            problems.append(("trainable", f"entry {pattern!r} is not a valid regex ({err})"))
    return problems


@dataclass
class QuantizationConfig:
    """Store the frozen base's linear layers quantized (QLoRA): every linear but the output head."""

    method: Literal["none", "nf4", "fp4", "int8"] = "none"
    """none = full precision; nf4 = 4-bit NormalFloat (QLoRA); fp4 = bitsandbytes' 4-bit float (the
    QLoRA paper's baseline, less accurate than nf4); int8 = per-row absmax int8."""
    double_quant: bool = True
    """NF4/FP4 only: quantize the per-block absmax to 8 bits too (4.127 instead of 4.5 bits per weight)."""
    blocksize: int = 64
    """NF4/FP4 only: weights per absmax block; 32, 64, 128 or 256."""
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "bf16"
    """dtype the weight is dequantized to for the matmul; auto = bf16 where supported, else fp32."""

    def check(self) -> list[tuple[str, str]]:
        if self.blocksize not in (32, 64, 128, 256):
            return [("blocksize", f"must be 32, 64, 128 or 256, got {self.blocksize}")]
        return []


DataFormat = Literal["auto", "alpaca", "prompt_completion", "messages", "sharegpt", "text"]
Template = Literal["auto", "tokenizer", "chatml", "llama2", "alpaca"]


@dataclass
class DataConfig:
    """Where the examples come from and how they become token sequences."""

    train: str | list[str] | None = None
    """JSONL / JSON / CSV / Parquet file, or a directory saved with `datasets`; a list of them is concatenated
    (e.g. the task's rows and self-distilled replay rows from `lorakit synth replay`)."""
    eval: str | None = None
    """Evaluation file; when absent, `eval_ratio` of train is held out (seeded)."""
    test: str | None = None
    format: DataFormat = "auto"
    template: Template = "auto"
    """auto = the tokenizer's own chat template when it has one, else chatml."""
    system_prompt: str | None = None
    max_length: int = 512
    packing: bool = True
    share_prefix: bool = True
    """With packing: the token prefix every example starts with (e.g. the system turn) is put
    once per packed row and attended to by each example in it. Exact, and faster."""
    eval_ratio: float = 0.1
    test_ratio: float = 0.0
    text_column: str = "text"
    """task: classification: the column holding each row's text."""
    label_column: str = "label"
    """task: classification: the column holding each row's label (the label set is read from data.train)."""

    @property
    def train_files(self) -> list[str]:
        """data.train as a list of paths (one file, several, or none)."""
        if not self.train:
            return []
        return [self.train] if isinstance(self.train, str) else list(self.train)

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.max_length < 8:
            problems.append(("max_length", f"must be >= 8, got {self.max_length}"))
        for key in ("eval_ratio", "test_ratio"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                problems.append((key, f"must be in [0, 1), got {value}"))
        if self.eval_ratio + self.test_ratio >= 1.0:
            problems.append(("eval_ratio", "eval_ratio + test_ratio must be < 1 so some data is left to train on"))
        return problems


@dataclass
class KLToBaseConfig:
    """A KL term to the base model's next-token distributions (see lorakit.train.kl_anchor)."""

    weight: float = 0.0
    """0 = off. The step's loss is mean cross-entropy + weight * mean KL(base || tuned) over the positions below."""
    on: AnchorOn | list[AnchorOn] = "replay"
    """replay: the trained tokens of replay rows (kind: replay); non_target: every position whose next token
    is not trained (prompts, system turn); all: every position. A list takes the union (e.g. [replay, non_target])."""

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if not self.weight >= 0:
            problems.append(("weight", f"must be >= 0, got {self.weight}"))
        if isinstance(self.on, list) and not self.on:
            problems.append(("on", "is an empty list; use replay, non_target or all"))
        return problems


@dataclass
class EarlyStopConfig:
    """Stop training when a generation metric of the `eval:` section stops improving."""

    metric: str = "fact"
    """One of eval.metrics (higher is better); adapter-best/ then keeps the adapter that scored best on it."""
    on: Literal["eval"] = "eval"
    """The split it is measured on: the first eval.max_examples rows of the eval split."""
    patience: int = 3
    """Stop after this many generation evals in a row without a new best."""

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.metric not in METRICS:
            problems.append(("metric", f"unknown metric {self.metric}; choose from {', '.join(METRICS)}"))
        if self.patience < 1:
            problems.append(("patience", f"must be >= 1, got {self.patience}"))
        return problems


@dataclass
class TrainConfig:
    """The optimisation: steps, batch, learning rate, precision, logging and checkpoints."""

    epochs: float = 1.0
    max_steps: int = 0
    """Optimizer steps; 0 = derived from epochs."""
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    warmup_steps: int = 0
    """When > 0, overrides warmup_ratio."""
    max_grad_norm: float = 1.0
    """0 disables clipping."""
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto = bf16 autocast where the device supports it fast, else fp32."""
    gradient_checkpointing: bool = False
    compile: bool = False
    fused_mlp: bool = True
    """LoRA: run Llama-style SwiGLU MLPs as one autograd Function that keeps less for backward (same results)."""
    recompute_norms: bool = True
    """Backward recomputes each norm's output from the input the norm keeps, instead of keeping it for the
    projections after it (same results; two norms per layer of extra work)."""
    memory_budget_gb: float = 0.0
    """Peak memory to stay under: as many fused MLPs as needed redo two matmuls in backward instead of keeping
    their outputs (same results, slower); 0 = off, keep everything."""
    cache_frozen: bool = True
    """Adapters on the upper blocks only: keep the output of the frozen blocks below from the first epoch and
    replay it after, instead of recomputing it (same results; single process)."""
    device: str = "auto"
    log_every: int = 10
    eval_every: int = 0
    """Evaluate every N optimizer steps; 0 = only at the end."""
    eval_max_batches: int = 0
    """Cap on eval batches per evaluation; 0 = the whole eval set."""
    save_every: int = 0
    """Write a resumable checkpoint every N steps; 0 = only at the end."""
    keep_checkpoints: int = 2
    tensorboard: bool = False
    kl_to_base: KLToBaseConfig = field(default_factory=KLToBaseConfig)
    early_stop: EarlyStopConfig | None = None
    """Stop on a generation metric (needs eval.every > 0); adapter-best/ follows that metric instead of eval loss."""

    def check(self) -> list[tuple[str, str]]:
        problems = []
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "log_every": self.log_every,
                    "keep_checkpoints": self.keep_checkpoints}
        problems += [(k, f"must be >= 1, got {v}") for k, v in positive.items() if v < 1]
        non_negative = {"max_steps": self.max_steps, "eval_every": self.eval_every, "save_every": self.save_every,
                        "warmup_steps": self.warmup_steps, "eval_max_batches": self.eval_max_batches,
                        "weight_decay": self.weight_decay, "max_grad_norm": self.max_grad_norm,
                        "memory_budget_gb": self.memory_budget_gb}
        problems += [(k, f"must be >= 0, got {v}") for k, v in non_negative.items() if v < 0]
        if self.lr <= 0:
            problems.append(("lr", f"must be > 0, got {self.lr}"))
        if self.epochs <= 0 and self.max_steps == 0:
            problems.append(("epochs", f"must be > 0 (or set max_steps), got {self.epochs}"))
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}"))
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            problems.append(("adam_betas", f"must be two numbers in [0, 1), got {self.adam_betas}"))
        return problems


@dataclass
class DistributedConfig:
    """How several processes share the training (torchrun); a single process ignores it."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every rank holds the whole model, trainable gradients are all-reduced;
    fsdp: FSDP2 (fully_shard per decoder layer): parameters, gradients, optimizer state sharded."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """auto: nccl on CUDA, gloo on CPU."""
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """fsdp: dtype of the gradient reduce-scatter (parameters are gathered in bf16 when training in bf16)."""
    timeout_s: int = 1800
    """A collective waiting longer than this fails the job (torchrun already stops it when one rank exits)."""

    def check(self) -> list[tuple[str, str]]:
        if self.timeout_s < 10:
            return [("timeout_s", f"must be >= 10 seconds, got {self.timeout_s}")]
        return []


@dataclass
class EvalConfig:
    """Generation metrics during training: answers to a sample of the eval set, scored and logged."""

    every: int = 0
    """Every N optimizer steps, and at the end; 0 = off (generation costs time)."""
    metrics: list[str] = field(default_factory=lambda: ["fact", "exact_match", "token_f1", "rougeL"])
    max_examples: int = 32
    """Eval rows generated for (the first N of the eval split)."""
    max_new_tokens: int = 64
    batch_size: int = 8

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.every < 0:
            problems.append(("every", f"must be >= 0, got {self.every}"))
        for key in ("max_examples", "max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                problems.append((key, f"must be >= 1, got {getattr(self, key)}"))
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            problems.append(("metrics", f"unknown metric {', '.join(unknown)}; choose from {', '.join(METRICS)}"))
        if not self.metrics:
            problems.append(("metrics", f"is empty; choose from {', '.join(METRICS)}"))
        return problems


STRATEGIES = ("auto", "json", "answer_first")


@dataclass
class SynthConfig:
    """`lorakit synth qa`: question/answer rows from documents, written by a teacher model window by window."""

    strategy: str = "auto"
    """json: the teacher writes question/answer pairs as JSON per window (for a capable teacher);
    answer_first: answers found by rule in each sentence, the teacher writes one question per answer,
    kept when it answers its own question with it (synth/answer_first.py); auto: answer_first for a
    local teacher under 1B parameters, json otherwise (an endpoint, a bigger local model)."""
    spans_per_sentence: int = 4
    """answer_first: candidate answers asked about per sentence (at most)."""
    question_tokens: int = 40
    """answer_first: reply tokens for a question or a rewording."""
    answer_tokens: int = 24
    """answer_first: reply tokens for the round-trip answer."""
    second_question: str = "always"
    """answer_first: the cloze prompt (the sentence with its answer blanked) asks again for every answer (always:
    a second wording of each fact) or only where the first question failed (retry)."""
    statements: bool = False
    """answer_first: a sentence whose every pair was lost gets one "Tell me about <name>." row answered by the
    sentence (no teacher call), so what it says is trained too."""
    round_trip: str = "contains"
    """answer_first: contains keeps a pair when the teacher's answer holds the span; exclusive also asks that it
    holds none of the sentence's other spans the question does not name (stricter: fewer, cleaner pairs)."""
    window_tokens: int = 384
    """Document text per teacher call (teacher tokens; words x 1.3 for an endpoint without a local tokenizer)."""
    overlap_tokens: int = 64
    """Text the next window repeats from the end of the previous one, so no fact is cut in two."""
    text_column: str = "text"
    """The column holding each document in a .jsonl file."""
    facts_per_window: int = 5
    paraphrases: int = 2
    """Other wordings asked for per fact question."""
    unanswerable_per_window: int = 2
    refusal: str = DEFAULT_REFUSAL
    """The answer of every unanswerable question (and what a fact answer must not contain)."""
    max_new_tokens: int = 512
    temperature: float = 0.0
    """0 = greedy; above 0 the teacher samples, seeded by `seed` (endpoints that accept a seed)."""
    seed: int = 0
    batch_size: int = 8
    """Local teacher: windows generated at once."""
    concurrency: int = 4
    """Endpoint teacher: requests in flight."""
    timeout_s: float = 120.0
    retries: int = 4
    """Endpoint teacher: tries after the first on 429 / 5xx / connection errors, with exponential backoff."""
    backoff_s: float = 1.0
    grounding_threshold: float = 0.9
    """A fact not found verbatim (after normalisation) in its window is kept when its best fuzzy match there
    scores at least this (difflib ratio, 0-1)."""
    dedup_jaccard: float = 0.8
    """Questions whose word 3-gram Jaccard similarity with an earlier kept question reaches this are dropped."""
    min_question_words: int = 3
    max_question_words: int = 40
    max_answer_words: int = 60
    heldout_fraction: float = 0.3
    """Share of facts with another wording whose other wording goes to heldout.jsonl instead of train.jsonl."""
    unanswerable_fraction: float = 0.3
    """Share of unanswerable questions in unanswerable.jsonl; the rest train the refusal."""
    ngram_guard: int = 6
    """No held-out or unanswerable question shares a word sequence this long with a training row."""

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.second_question not in ("always", "retry"):
            problems.append(("second_question", f"must be always or retry, got {self.second_question!r}"))
        if self.round_trip not in ("contains", "exclusive"):
            problems.append(("round_trip", f"must be contains or exclusive, got {self.round_trip!r}"))
        if self.strategy not in STRATEGIES:
            problems.append(("strategy", f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}"))
        positive = {k: getattr(self, k) for k in ("window_tokens", "max_new_tokens", "batch_size", "concurrency",
                                                  "spans_per_sentence", "question_tokens", "answer_tokens",
                                                  "min_question_words", "max_question_words", "max_answer_words",
                                                  "ngram_guard")}
        problems += [(k, f"must be >= 1, got {v}") for k, v in positive.items() if v < 1]
        non_negative = {k: getattr(self, k) for k in ("overlap_tokens", "facts_per_window", "paraphrases",
                                                      "unanswerable_per_window", "retries", "backoff_s", "temperature")}
        problems += [(k, f"must be >= 0, got {v}") for k, v in non_negative.items() if v < 0]
        if self.overlap_tokens >= self.window_tokens:
            problems.append(("overlap_tokens", f"must be < window_tokens ({self.window_tokens}), got {self.overlap_tokens}"))
        if self.facts_per_window + self.unanswerable_per_window == 0:
            problems.append(("facts_per_window", "and unanswerable_per_window are both 0; nothing would be asked"))
        if not self.refusal.strip():
            problems.append(("refusal", "is empty; give the sentence unanswerable questions are answered with"))
        if self.timeout_s <= 0:
            problems.append(("timeout_s", f"must be > 0, got {self.timeout_s}"))
        for key in ("grounding_threshold", "dedup_jaccard"):
            if not 0.0 < getattr(self, key) <= 1.0:
                problems.append((key, f"must be in (0, 1], got {getattr(self, key)}"))
        for key in ("heldout_fraction", "unanswerable_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                problems.append((key, f"must be in [0, 1], got {getattr(self, key)}"))
        if self.min_question_words > self.max_question_words:
            problems.append(("min_question_words", f"is above max_question_words ({self.max_question_words})"))
        return problems


@dataclass
class ServeConfig:
    """`lorakit serve`: where it listens and the limits each request meets (see lorakit.serve)."""

    host: str = "127.0.0.1"
    """Loopback by default; 0.0.0.0 exposes the server to the network (set api_key_env then)."""
    port: int = 8000
    api_key_env: str | None = None
    """Name of an environment variable holding the API key; every route but /health then needs
    `Authorization: Bearer KEY`. The key itself never goes in a config file."""
    max_batch: int = 32
    """Rows decoded together; requests beyond it wait in the queue."""
    max_queue: int = 256
    """Requests waiting for a row; one more gets 429 with Retry-After."""
    max_prompt_tokens: int = 2048
    max_tokens: int = 512
    """Cap on a request's max_tokens (and its default when the request gives none)."""
    request_timeout_s: float = 300.0
    grace_s: float = 30.0
    """On SIGTERM: in-flight requests get this long to finish, then are cancelled; the server exits 0."""
    allow_runtime_adapters: bool = False
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's routes); off by default."""
    adapter_root: str | None = None
    """Runtime loading reads only adapter directories under this directory."""

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append(("port", f"must be in 0..65535 (0 = any free port), got {self.port}"))
        for key in ("max_batch", "max_queue", "max_prompt_tokens", "max_tokens"):
            if getattr(self, key) < 1:
                problems.append((key, f"must be >= 1, got {getattr(self, key)}"))
        for key in ("request_timeout_s", "grace_s"):
            if not getattr(self, key) > 0:
                problems.append((key, f"must be > 0 seconds, got {getattr(self, key)}"))
        if self.allow_runtime_adapters and not self.adapter_root:
            problems.append(("adapter_root", "is unset but allow_runtime_adapters is on; give the directory "
                             "runtime-loaded adapters must live under"))
        return problems


@dataclass
class SweepConfig:
    """`lorakit sweep`: the grid and what scores a trial, when the command line does not say (its options win)."""

    grid: list[str] = field(default_factory=list)
    """One "KEY=V1,V2,..." per swept key, as --grid; the trials are the cartesian product."""
    paired: list[str] = field(default_factory=list)
    """"K1,K2=a1:b1,a2:b2": keys that move together, as --paired (e.g. adapter.r with adapter.alpha)."""
    metric: str = "eval_loss"
    """What ranks the trials: any metric a trial reports (eval_loss, fact, retention, ...)."""
    direction: Literal["auto", "min", "max"] = "auto"
    """auto: min for losses and perplexities, max for everything else."""
    out: str | None = None
    """The sweep directory; default: output_dir + "-sweep"."""
    eval_data: list[str] = field(default_factory=list)
    """Question files each trial's adapter answers (generation metrics, as `lorakit compare --data`)."""
    general: str | None = None
    """General questions for the forgetting check (retention against the base model)."""
    text: str | None = None
    """Plain text for perplexity against the base model (text_perplexity)."""

    def check(self) -> list[tuple[str, str]]:
        if not self.metric.strip():
            return [("metric", "is empty; name a metric a trial reports, e.g. eval_loss")]
        return []


@dataclass
class ClassificationConfig:
    """task: classification (lorakit.classify): one label per row from a set read from the training data."""

    method: Literal["lm_label", "head"] = "lm_label"
    """lm_label: the causal LM answers with the label (scored by the label tokens' probabilities, trained as
    SFT on the answer); head: AutoModelForSequenceClassification, LoRA on the body, the head trained in full."""
    prompt: str | None = None
    """lm_label: the user turn around the text, with {text} (and optionally {labels}, the label set joined by
    ", "); default: the text, then "Answer with one of: {labels}.". head: unused (the text alone)."""
    labels: list[str] | None = None
    """The label set, in order; default: every label data.train holds, sorted. When given, a row with another
    label is an error."""

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.prompt is not None and "{text}" not in self.prompt:
            problems.append(("prompt", "has no {text} placeholder; put {text} where the row's text goes"))
        if self.labels is not None:
            if len(set(self.labels)) < 2 or len(set(self.labels)) != len(self.labels):
                problems.append(("labels", f"must be at least two distinct labels, got {self.labels}"))
            if any(not str(label).strip() for label in self.labels):
                problems.append(("labels", "holds an empty label; every label needs text"))
        return problems


@dataclass
class Config:
    """A whole run: model, adapter, data, training and where outputs go."""

    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    output_dir: str = "runs/run"
    seed: int = 0
    task: Literal["sft", "classification"] = "sft"
    """sft: chat / text fine-tuning; classification: one label per row (see the classification section)."""
    classification: ClassificationConfig = field(default_factory=ClassificationConfig)

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if not self.output_dir.strip():
            problems.append(("output_dir", "is empty; give a directory for the run's outputs"))
        stop = self.train.early_stop
        if stop is not None and stop.metric not in self.eval.metrics:
            computed = ", ".join(self.eval.metrics)
            problems.append(("train.early_stop.metric", f"is {stop.metric}, which eval.metrics ({computed}) does not "
                             "compute; add it to eval.metrics or stop on one of those"))
        if stop is not None and self.eval.every <= 0:
            problems.append(("train.early_stop", "needs generation evals during training; set eval.every to N > 0 "
                             "(a generation eval every N steps)"))
        if self.adapter.method in ("full", "selective") and self.quantization.method != "none":
            problems.append(("quantization.method", f"is {self.quantization.method}, but adapter.method "
                             f"{self.adapter.method} trains base weights and a quantized base cannot be trained; "
                             "set quantization.method: none, "
                             "or train adapters with adapter.method: qlora"))
        if self.adapter.method == "prompt_tuning" and self.train.kl_to_base.weight > 0:
            problems.append(("train.kl_to_base.weight", "must be 0 with adapter.method prompt_tuning: the KL anchor "
                             "compares with the base by switching LoRA layers off, and prompt tuning has none"))
        if self.task == "classification":
            problems += self._classification_problems()
        return problems

    def _classification_problems(self) -> list[tuple[str, str]]:
        problems = []
        if not self.data.train_files:
            problems.append(("data.train", "is unset; task: classification reads its label set from the training data"))
        if self.classification.method == "head" and self.adapter.method not in ("lora", "full"):
            problems.append(("adapter.method", f"is {self.adapter.method}; classification.method head trains lora "
                             "or full"))
        return problems

    def resolve(self) -> Config:
        """Fill in what one setting implies: qlora without a quantization method means nf4."""
        if self.adapter.method == "qlora" and self.quantization.method == "none":
            self.quantization.method = "nf4"
        return self


# ----------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from defaults when `path` is None) and validate it."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    problems: list[str] = []
    for item in overrides or []:
        try:
            _apply_override(raw, item)
        except ValueError as err:
            problems.append(str(err))
    cfg = from_dict(Config, raw, problems=problems).resolve()
    if problems:
        where = str(path) if path is not None else "config"
        raise ConfigError([f"{where}: {p}" for p in problems])
    return cfg


def from_dict(cls: type, data: Any, prefix: str = "", problems: list[str] | None = None) -> Any:
    """Build dataclass `cls` from plain data, appending every problem found to `problems`.

    Raises ConfigError when `problems` is None and something is wrong.
    """
    own = problems is None
    problems = [] if own else problems
    obj = _build(cls, data, prefix, problems)
    if own and problems:
        raise ConfigError(problems)
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    from lorakit.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans: only true/false, so a key `on:` (train.kl_to_base.on,
    train.early_stop.on) stays the string "on" instead of becoming True, and yes/no/on/off stay strings."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                    list("tTfF"))


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError([f"config file not found: {path}; check the path"])
    if path.is_dir():
        raise ConfigError([f"config path is a directory: {path}; give a YAML file"])
    try:
        data = _load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"config file {path} is not UTF-8 text; save it as UTF-8 YAML"]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        reason = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError([f"config file {path}{line}: {reason}; fix the YAML syntax"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            [f"config file {path}: top level must be a mapping of sections, got {type(data).__name__}"]
        )
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as a YAML scalar or list."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--set {item!r}: expected section.key=value, e.g. --set adapter.r=8")
    try:
        parsed = _load_yaml(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(f"--set {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = parsed


# ----------------------------------------------------------------------------- checking

_NONE = type(None)


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {_kind(data)}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = _closest_key(str(key), list(fields))
            hint = f"; did you mean {prefix}{close}?" if close else f"; valid keys: {', '.join(fields)}"
            problems.append(f"{path}: unknown key{hint}")
            continue
        ok, converted, why = _convert(hints[key], value, path, problems)
        if ok:
            values[key] = converted
        elif why:
            problems.append(f"{path}: {why}")
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if check is not None:  # range checks; a field with a type problem kept its default
        for key, why in check():
            problems.append(f"{prefix}{key}: {why}")
    return obj


# Names users bring from PEFT, TRL and other tools.
_KEY_ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
                "target_modules": "target_modules", "model_name_or_path": "name", "model_name": "name"}


def _closest_key(key: str, valid: list[str]) -> str | None:
    alias = _KEY_ALIASES.get(key.lower())
    if alias in valid:
        return alias
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return close[0] if close else None


def _convert(tp: Any, value: Any, path: str, problems: list[str]) -> tuple[bool, Any, str]:
    """Return (ok, value, reason). Nested dataclass problems go straight into `problems`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        before = len(problems)
        obj = _build(tp, value, path + ".", problems)
        return len(problems) == before, obj, ""
    if origin in (Union, types.UnionType):
        if value is None and _NONE in args:
            return True, None, ""
        reasons = []
        for arg in args:
            if arg is _NONE:
                continue
            ok, converted, why = _convert(arg, value, path, problems)
            if ok:
                return True, converted, ""
            reasons.append(why)
        return False, None, reasons[0] if len(reasons) == 1 else f"expected {_type_name(tp)}, got {_kind(value)}"
    if origin is Literal:
        if value in args:
            return True, value, ""
        choices = ", ".join(repr(a) for a in args)
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return False, None, f"must be one of {choices}, got {value!r}{hint}"
    if origin is list:
        (item_tp,) = args or (Any,)
        if isinstance(value, str) and item_tp is str:
            return True, [value], ""  # a single name is a one-item list
        if not isinstance(value, list):
            return False, None, f"expected a list, got {_kind(value)}"
        out = []
        for i, item in enumerate(value):
            ok, converted, why = _convert(item_tp, item, f"{path}[{i}]", problems)
            if not ok:
                return False, None, f"item {i}: {why}"
            out.append(converted)
        return True, out, ""
    if origin is dict:
        if not isinstance(value, dict):
            return False, None, f"expected a mapping, got {_kind(value)}"
        return True, dict(value), ""
    if tp is Any:
        return True, value, ""
    if tp is bool:
        if isinstance(value, bool):
            return True, value, ""
        return False, None, f"expected true or false, got {_kind(value)}"
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value, ""
        if isinstance(value, float) and value.is_integer():
            return True, int(value), ""
        return False, None, f"expected an integer, got {_kind(value)}"
    if tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            return False, None, f"expected a number, got {_kind(value)}"
        if not math.isfinite(number):  # nan / inf would reach the optimizer or overflow a step count
            return False, None, f"must be a finite number, got {value!r}"
        return True, number, ""
    if tp is str:
        if isinstance(value, str):
            return True, value, ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, str(value), ""
        return False, None, f"expected a string, got {_kind(value)}"
    raise TypeError(f"config field {path} has an unsupported type {tp!r}")  # a bug, not user input


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not _NONE]
    return " or ".join(getattr(a, "__name__", str(a)) for a in args)
