"""The training loop, in plain PyTorch (no HF Trainer, no TRL).

train() is a recipe of four stages: setup() (model, adapters, data, loss, optimizer: a `Run`)
-> resume_state() (a `TrainState` from the newest usable checkpoint, or step 0) -> step_loop()
(per optimizer step: train_step() over grad_accum micro-batches -> log / evaluate() /
save_checkpoint()) -> finish() (final evaluation, adapter or model, eval.json, report.html).
Everything the user sees comes from rank 0 (train.distributed). The loop imports `eval`
lazily, and only for generation metrics during training and the report at the end.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit import __version__
from lorakit.adapters.fused_mlp import fuse_lora_mlps, recompute_mlps
from lorakit.adapters.inject import parameter_summary
from lorakit.adapters.methods import has_adapter, save_trained
from lorakit.adapters.setup import prepare_model
from lorakit.config import Config, dump_config
from lorakit.data.batching import to_device
from lorakit.errors import LorakitError
from lorakit.io import atomic_write_text, remove_stale_temps
from lorakit.losses import LossFn, full_loss_sum
from lorakit.memory import allocator_in_use, find_tcmalloc, low_fragmentation, peak_rss_mb, rss_mb
from lorakit.models.attention import gqa_attention
from lorakit.models.load import load_model, quant_spec
from lorakit.train import distributed as dist
from lorakit.train import norm_recompute
from lorakit.train.checkpoint import TrainState, load_checkpoint, newest_usable_checkpoint, save_checkpoint
from lorakit.train.early_stop import EarlyStop, check_rows
from lorakit.train.frozen_cache import frozen_block_cache
from lorakit.train.kl_anchor import KLAnchor
from lorakit.train.log import MetricsLog, progress_bar
from lorakit.train.loss import IGNORE, check_fast_loss, fast_loss_sum
from lorakit.train.memory_plan import plan
from lorakit.train.optim import build_optimizer, lr_at, set_lr
from lorakit.train.support import (additive_mask, autocast_dtype, model_dtype, packing_works, prefix_mask_form,
                                   resolve_device, with_additive_masks)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # per optimizer step, mean over all ranks
    eval_loss: float | None = None
    tokens: int = 0
    trained_tokens: int = 0
    elapsed: float = 0.0
    peak_rss_mb: float | None = None
    frozen_replays: int = 0  # batches whose frozen lower blocks were replayed, not recomputed
    early_stopped_at: int | None = None  # train.early_stop: the step training stopped at (None: it ran to the end)
    best_step: int | None = None  # train.early_stop: the step of the best generation metric (adapter-best/)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class BatchStream:
    """Micro-batches in a seeded order, epoch after epoch; (epoch, index) is the resume point."""

    def __init__(self, items: list, batch_size: int, pad_id: int, seed: int, epoch: int = 0, index: int = 0) -> None:
        self._make = lambda ep: dist.rank_batches(items, batch_size, pad_id, seed, ep)  # this rank's slice of each global batch
        self.epoch, self.index = epoch, index
        self._batches = self._make(epoch)
        if not self._batches:
            raise LorakitError("the training set makes no batches; add data or lower train.batch_size")

    def __len__(self) -> int:
        return len(self._batches)

    def next(self) -> dict[str, torch.Tensor]:
        if self.index >= len(self._batches):
            self.epoch += 1
            self.index = 0
            self._batches = self._make(self.epoch)
        batch = self._batches[self.index]
        self.index += 1
        return batch


def trained_count(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def real_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that are not padding (make_batches counts them; packed batches have no mask)."""
    return int(batch["num_real"]) if "num_real" in batch else int(batch["input_ids"].numel())


def train_step(
    model: nn.Module,
    loss_fn: LossFn,
    micro_batches: list[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float,
    amp: Any,
    step: int,
    anchor: KLAnchor | None = None,
) -> tuple[float, float, float | None]:
    """One optimizer step over the micro-batches: (loss, grad norm, KL to the base or None).

    The loss is the mean cross-entropy over all trained tokens (of all ranks); with `anchor`
    (the KLAnchor inside `loss_fn`) the gradient is that of loss + weight * mean KL over the
    step's anchor positions, and the mean KL is returned.
    """
    total = dist.sum_over_ranks(sum(trained_count(b) for b in micro_batches))
    if total == 0:
        raise LorakitError(f"step {step}: no trained tokens in the batch; check the data's loss masks (lorakit data check)")
    if anchor is not None:
        anchored = dist.sum_over_ranks(sum(anchor.positions(b) for b in micro_batches))
        anchor.scale = anchor.weight * total / anchored if anchored else 0.0
        anchor.kl_sum = 0.0
    loss_sum = 0.0
    for i, batch in enumerate(micro_batches):
        with dist.grad_sync(loss_fn, last=i == len(micro_batches) - 1):
            with amp():
                part, _ = loss_fn(model, batch)
            (part * dist.world_size() / total).backward()  # DDP / FSDP average over ranks: x world_size
        loss_sum += float(part.detach())
    if anchor is not None:
        loss_sum -= anchor.scale * anchor.kl_sum  # the reported loss is the cross-entropy alone
    loss = dist.sum_over_ranks(loss_sum) / total
    if not math.isfinite(loss):
        raise LorakitError(
            f"loss became {loss} at step {step}; likely causes: learning rate too high (train.lr), fp16 overflow, "
            "or broken data. The last good checkpoint is kept; lower train.lr and resume"
        )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = dist.clip_grad_norm(params, max_grad_norm)  # over all shards under FSDP
    if not math.isfinite(grad_norm):  # applying it would write NaN weights into the next checkpoint
        optimizer.zero_grad(set_to_none=True)
        raise LorakitError(
            f"gradient norm became {grad_norm} at step {step} (loss {loss:.4g}); the step was not applied. Likely "
            "causes: learning rate too high (train.lr), fp16 overflow, or broken data. The last good checkpoint is "
            "kept; lower train.lr and resume"
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    kl = None
    if anchor is not None:
        kl = dist.sum_over_ranks(anchor.kl_sum) / anchored if anchored else None
        anchor.scale = 0.0
    return loss, grad_norm, kl


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: LossFn, batches: list[dict[str, torch.Tensor]], amp: Any) -> float | None:
    """Mean loss over every trained token of the eval batches (None when there are none)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        with amp():
            part, n = loss_fn(model, batch)
        total += float(part)
        count += n
    model.train(was_training)
    return total / count if count else None


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    holds_run = (run_dir / "config.yaml").exists() or (run_dir / "checkpoints").exists()
    if holds_run and not resume:
        raise LorakitError(
            f"{run_dir} already holds a run; pass --resume to continue it, or choose another directory "
            f"with --set output_dir=..."
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise LorakitError(f"output_dir {run_dir} is a file; choose a directory")


def _compile_layers(model: nn.Module) -> int:
    """torch.compile each decoder block (the largest ModuleList): one graph, reused by every block."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return 0
    blocks = max(lists, key=len)
    for block in blocks:
        block.compile()
    return len(blocks)


@dataclass
class Run:
    """What set-up builds once and every later stage of train() uses."""

    cfg: Config
    run_dir: Path
    console: Any
    device: torch.device
    amp_dtype: torch.dtype | None  # None: plain fp32
    model: nn.Module
    tokenizer: Any
    data: Any  # lorakit.data.DataBundle
    meta: dict[str, Any]  # lorakit.json of every adapter this run writes
    stopper: EarlyStop | None = None  # train.early_stop
    adapted: list[str] = field(default_factory=list)  # module paths with an adapter
    train_items: list[Any] = field(default_factory=list)  # packed rows, or the examples themselves
    eval_batches: list[dict[str, torch.Tensor]] = field(default_factory=list)
    pad_id: int = 0
    stream: BatchStream | None = None  # the training batches from the start (resume replaces it)
    total_steps: int = 0
    loss_fn: LossFn | None = None
    anchor: KLAnchor | None = None  # train.kl_to_base (also inside loss_fn)
    fused_mlps: list[Any] = field(default_factory=list)
    attention_undo: Any = None  # switches the model back from the training attention (models.attention)
    norm_hooks: list = field(default_factory=list)  # train.recompute_norms' forward hooks (norm_recompute.install)
    frozen: Any = None  # the frozen_block_cache, when train.cache_frozen applies
    optimizer: torch.optim.Optimizer | None = None
    log: MetricsLog | None = None  # rank 0 only
    clock: float = 0.0  # time.perf_counter() at elapsed 0 (earlier sessions' time included)

    def amp(self) -> Any:
        """The autocast context of train.precision (a no-op for fp32)."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    def elapsed(self) -> float:
        return time.perf_counter() - self.clock


def train(cfg: Config, resume: bool = False, console: Any = None, quiet: bool = False) -> TrainResult:
    """Run the training described by `cfg`; writes the run directory under cfg.output_dir.

    The recipe: set up (model, data, loss, optimizer) -> resume (TrainState and data position
    from the newest usable checkpoint) -> the step loop (train_step, logging, evaluation,
    checkpoints) -> finish (final evaluation, adapter or model, last checkpoint, eval.json).
    """
    from rich.console import Console

    console = console or Console(quiet=quiet or not dist.is_main())
    run = setup(cfg, resume, console)
    state, stream = resume_state(run, resume)
    open_log(run, state, resume)
    result = TrainResult(run_dir=run.run_dir, steps=run.total_steps)
    run.clock = time.perf_counter() - state.elapsed
    with low_fragmentation():  # activations freed in backward go back to the OS, not into heap holes (memory.py)
        step_loop(run, state, stream, result, quiet)
        finish(run, state, stream, result)
    return result


def setup(cfg: Config, resume: bool, console: Any) -> Run:
    """The run directory checked, the model loaded and adapted, the data tokenized and batched,
    the loss chosen, the model wrapped for the configured options, the optimizer built."""
    run_dir = Path(cfg.output_dir)
    _check_run_dir(run_dir, resume)
    if dist.is_main():  # what an interrupted atomic write left behind
        for where in (run_dir, run_dir / "checkpoints"):
            remove_stale_temps(where)
    device = dist.setup(cfg.distributed, resolve_device(cfg.train.device))  # under torchrun: process group, cuda:LOCAL_RANK
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    seed_everything(cfg.seed)
    run = _load(cfg, run_dir, console, device, amp_dtype)
    mask_form = _batch_data(run)
    run.loss_fn = _choose_loss(run, mask_form)
    _wrap_model(run)
    dist.seed_ranks(cfg.seed)
    run.optimizer = build_optimizer(run.model, cfg.train, device)
    return run


def _load(cfg: Config, run_dir: Path, console: Any, device: torch.device, amp_dtype: torch.dtype | None) -> Run:
    """The model (quantized as configured) and tokenizer, the tokenized data, the adapters."""
    from lorakit.data import build_datasets

    loaded = load_model(cfg.model.name, cfg.model.dtype, device, cfg.model.trust_remote_code, cfg.model.revision,
                        quantization=quant_spec(cfg.quantization, device))
    if loaded.quantization:
        q = loaded.quantization
        console.print(f"quantized {q['quantized_layers']} linear layers to {q['method']} "
                      f"(compute in {q['compute_dtype']}{', loaded layer by layer' if q['streamed'] else ''})")
    data = build_datasets(cfg.data, loaded.tokenizer, cfg.seed, cfg.adapter.virtual_tokens)
    meta = {
        "lorakit_version": __version__, "base_model": cfg.model.name, "method": cfg.adapter.method,
        "template": cfg.data.template, "system_prompt": cfg.data.system_prompt, "max_length": cfg.data.max_length,
        "quantization": loaded.quantization,
    }
    if loaded.revision:  # a hub model: the commit loaded, in config.yaml and lorakit.json, reloaded later
        cfg.model.revision = meta["base_model_revision"] = loaded.revision
    run = Run(cfg, run_dir, console, device, amp_dtype, loaded.model, loaded.tokenizer, data, meta)
    run.stopper = _early_stopper(cfg, data.eval)  # None without train.early_stop
    run.adapted = prepare_model(run.model, cfg.adapter, loaded.tokenizer)
    console.print(f"model {cfg.model.name}: {parameter_summary(run.model)}")
    if device.type == "cpu":
        allocator = allocator_in_use()
        hint = ""
        if allocator == "glibc":
            hint = ("; tcmalloc (Debian/Ubuntu: apt-get install libtcmalloc-minimal4) makes CPU training steps ~1.5x "
                    "faster at the same peak memory, and the lorakit command uses it where installed"
                    if find_tcmalloc() is None else " (LORAKIT_ALLOCATOR=system, or lorakit called as a library)")
        console.print(f"memory allocator: {allocator}{hint}", markup=False, highlight=False)
    if cfg.adapter.method == "selective":
        shown = ", ".join(run.adapted[:3]) + (f" and {len(run.adapted) - 3} more" if len(run.adapted) > 3 else "")
        console.print(f"selective: {len(run.adapted)} parameter tensors train: {shown}", markup=False)
    return run


def _batch_data(run: Run) -> str | None:
    """Train rows (packed once, by build_datasets) and eval batches; returns how the model takes the
    shared-prefix mask ("bool", "float" or None: no shared prefix)."""
    from lorakit.data import make_batches, pack_examples, shared_prefix_length

    cfg, model, data, tc = run.cfg, run.model, run.data, run.cfg.train
    if cfg.data.packing and not packing_works(model, run.device):
        raise LorakitError(
            f"{type(model).__name__} does not isolate packed sequences by position_ids; set data.packing: false"
        )
    prefix, mask_form = data.stats.shared_prefix if cfg.data.packing else 0, None
    if prefix:
        mask_form = prefix_mask_form(model, run.device)
        if mask_form is None:
            run.console.print(f"{type(model).__name__} takes no 4D attention mask here; packing without the shared prefix")
            prefix = 0
    if not cfg.data.packing:
        run.train_items = data.train
    elif prefix == data.stats.shared_prefix and data.packed is not None:
        run.train_items = data.packed
    else:  # the model refused the shared prefix build_datasets packed with
        run.train_items = pack_examples(data.train, cfg.data.max_length + cfg.adapter.virtual_tokens, cfg.seed, prefix)
    if cfg.adapter.virtual_tokens:
        where = ("once per packed row, in the shared prefix" if prefix else
                 "one copy per example in a packed row" if cfg.data.packing else "one copy per example")
        run.console.print(f"prompt tuning: {cfg.adapter.virtual_tokens} virtual tokens before every example, {where}")
    if prefix:
        run.console.print(f"shared prefix: {prefix} tokens once per packed row; an epoch processes "
                          f"{sum(len(p.input_ids) for p in run.train_items):,} tokens instead of {data.stats.tokens['train']:,}")
    eval_items = (pack_examples(data.eval, cfg.data.max_length + cfg.adapter.virtual_tokens, cfg.seed,
                                shared_prefix_length(data.eval) if prefix else 0) if cfg.data.packing else data.eval)
    run.pad_id = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else 0
    run.eval_batches = [to_device(b, run.device)
                        for b in make_batches(eval_items, tc.batch_size, run.pad_id, cfg.seed, 0, shuffle=False)]
    if tc.eval_max_batches:
        run.eval_batches = run.eval_batches[: tc.eval_max_batches]
    run.stream = BatchStream(run.train_items, tc.batch_size, run.pad_id, cfg.seed)
    steps_per_epoch = max(1, math.ceil(len(run.stream) / tc.grad_accum))
    run.total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    return mask_form


def _choose_loss(run: Run, mask_form: str | None) -> LossFn:
    """The chunked loss when it matches the model's own logits on a probe batch (else full logits),
    inside the KL anchor with train.kl_to_base, converting masks for models that add them."""
    from lorakit.data import make_batches
    from lorakit.data.packing import is_replay

    model, tc = run.model, run.cfg.train
    probe = to_device(make_batches(run.train_items[:2], 2, run.pad_id, run.cfg.seed, 0, shuffle=False)[0], run.device)
    if mask_form == "float":
        probe["attention_mask"] = additive_mask(probe["attention_mask"], model_dtype(model))
    loss_fn: LossFn = fast_loss_sum if check_fast_loss(model, probe) else full_loss_sum
    if tc.kl_to_base.weight > 0:
        if run.cfg.adapter.method in ("full", "selective"):
            raise LorakitError("train.kl_to_base compares with the base through the switched-off adapters; "
                               f"{run.cfg.adapter.method} fine-tuning trains base weights and has none: "
                               "set train.kl_to_base.weight: 0 or adapter.method: lora")
        if loss_fn is not fast_loss_sum:
            raise LorakitError(f"train.kl_to_base needs a model whose output head is a plain linear layer; "
                               f"{type(model).__name__}'s is not: set train.kl_to_base.weight: 0")
        run.anchor = loss_fn = KLAnchor(tc.kl_to_base.weight, tc.kl_to_base.on)
        on = tc.kl_to_base.on if isinstance(tc.kl_to_base.on, list) else [tc.kl_to_base.on]
        if on == ["replay"] and not any(is_replay(x) for x in run.data.train):
            raise LorakitError("train.kl_to_base.on is replay, but no training row has kind: replay; add replay rows "
                               "(lorakit synth replay) or use train.kl_to_base.on: non_target")
    if mask_form == "float":
        loss_fn = with_additive_masks(loss_fn, model_dtype(model))
    return loss_fn


def _wrap_model(run: Run) -> None:
    """Gradient checkpointing, fused MLPs, compile, DDP / FSDP2 and the frozen-block cache, as configured."""
    model, tc = run.model, run.cfg.train
    if tc.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    run.fused_mlps = fuse_lora_mlps(model) if run.cfg.adapter.method == "lora" and tc.fused_mlp else []
    run.attention_undo = gqa_attention(model)
    if tc.memory_budget_gb and run.fused_mlps and not tc.gradient_checkpointing:
        _plan_memory(run)
    if tc.recompute_norms and not tc.gradient_checkpointing:
        run.norm_hooks = norm_recompute.install(model)
        run.loss_fn = norm_recompute.wrap(run.loss_fn)
    if run.cfg.adapter.method in ("dora", "ia3") and tc.fused_mlp:
        kind = {"dora": "DoRA", "ia3": "IA3"}[run.cfg.adapter.method]
        run.console.print(f"fused SwiGLU MLP off: {kind} layers run unfused (train.fused_mlp applies to method lora)")
    if tc.compile:
        _compile_layers(model)
    model.train()
    run.loss_fn = dist.parallelize(model, run.loss_fn, run.cfg.distributed, run.device, run.amp_dtype, tc.optimizer)
    run.frozen = frozen_block_cache(model) if tc.cache_frozen and not tc.compile and dist.world_size() == 1 else None
    if run.frozen is not None:
        run.loss_fn = run.frozen.wrap(run.loss_fn)
        run.console.print(f"blocks 0-{run.frozen.k - 1} have no adapter: their output is kept from the first epoch "
                          "and replayed after")


def _plan_memory(run: Run) -> None:
    """train.memory_budget_gb: recompute as many fused MLPs' gate and up as the estimate needs (memory_plan.py)."""
    tc = run.cfg.train
    compute_bytes = 2 if run.amp_dtype is not None else model_dtype(run.model).itemsize
    tokens = tc.batch_size * run.cfg.data.max_length
    p = plan(run.model, len(run.fused_mlps), tokens, compute_bytes, rss_mb() or 0.0, tc.memory_budget_gb,
             tc.recompute_norms)
    recompute_mlps(run.model, p.recompute_layers)
    run.console.print(f"memory budget {tc.memory_budget_gb:g} GB: estimated peak {p.keep_all_mb / 1024:.1f} GB keeping "
                      f"every activation; {p.recompute_layers} of {len(run.fused_mlps)} MLPs recompute gate and up "
                      f"in backward (estimate {p.estimate_mb / 1024:.1f} GB)")
    if p.estimate_mb > tc.memory_budget_gb * 1024:
        run.console.print("warning: the estimate stays over train.memory_budget_gb with every MLP recomputed; "
                          "set train.gradient_checkpointing: true or lower train.batch_size / data.max_length",
                          markup=False, highlight=False)


def resume_state(run: Run, resume: bool) -> tuple[TrainState, BatchStream]:
    """The TrainState and batch stream to start from: the newest usable checkpoint's with --resume
    (weights, optimizer and RNG restored into the model), else step 0."""
    state, stream = TrainState(), run.stream

    def warn(msg: str) -> None:
        run.console.print(f"warning: {msg}", markup=False, highlight=False)

    found = newest_usable_checkpoint(run.run_dir, warn) if resume else None  # damaged newer ones: warned, skipped
    dist.agree(found.step if found else 0, f"the step to resume from in {run.run_dir}",
               "output_dir must be a directory that every node sees")
    if found:
        state = TrainState.read(load_checkpoint(found, run.model, run.optimizer))
        if run.stopper is not None:
            run.stopper.restore(state.early_stop)
        stream = BatchStream(run.train_items, run.cfg.train.batch_size, run.pad_id, run.cfg.seed, state.epoch,
                             state.batch_index)
        run.console.print(f"resumed from {found.path} (step {state.step})")
    elif resume:
        run.console.print(f"no checkpoint in {run.run_dir} yet; starting from step 0")
    return state, stream


def open_log(run: Run, state: TrainState, resume: bool) -> None:
    """config.yaml and metrics.jsonl (truncated after the resumed step); a `start` event on a new run."""
    cfg, model = run.cfg, run.model
    if not dist.is_main():
        return
    run.run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run.run_dir / "config.yaml")
    run.log = MetricsLog(run.run_dir, cfg.train.tensorboard, resume_step=state.step if resume else None)
    if state.step == 0:
        stats = run.data.stats
        run.log.write("start", step=0, total_steps=run.total_steps, examples=len(run.data.train),
                      eval_examples=len(run.data.eval), sequences=len(run.train_items),
                      trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
                      adapted_modules=len(run.adapted), fused_mlps=len(run.fused_mlps), device=str(run.device),
                      precision=str(run.amp_dtype or "fp32"), world_size=dist.world_size(),
                      strategy=cfg.distributed.strategy if dist.launched() else None,
                      real_token_fraction=stats.real_token_fraction if hasattr(stats, "real_token_fraction") else None)


class LogWindow:
    """The steps since the last `train` log line: their losses, KLs to the base and tokens."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.losses: list[float] = []
        self.kls: list[float] = []  # the KL to the base of each step (train.kl_to_base)
        self.tokens, self.start = 0, time.perf_counter()

    def add(self, loss: float, kl: float | None, tokens: int) -> None:
        self.losses.append(loss)
        if kl is not None:
            self.kls.append(kl)
        self.tokens += tokens

    def tokens_per_s(self) -> float:
        return self.tokens / max(1e-9, time.perf_counter() - self.start)


def step_loop(run: Run, state: TrainState, stream: BatchStream, result: TrainResult, quiet: bool) -> None:
    """Optimizer steps until total_steps or an early stop; logging, evaluation and checkpoints between them."""
    tc = run.cfg.train
    window = LogWindow()
    with progress_bar(run.console, disable=quiet or not dist.is_main()) as bar:
        task = bar.add_task("train", total=run.total_steps, completed=state.step, loss="-", lr="-", tps="-")
        while state.step < run.total_steps and not (run.stopper is not None and run.stopper.stopped):
            lr = lr_at(state.step, run.total_steps, tc)
            set_lr(run.optimizer, lr)
            micro = [to_device(stream.next(), run.device) for _ in range(tc.grad_accum)]
            loss, grad_norm, kl = train_step(run.model, run.loss_fn, micro, run.optimizer, tc.max_grad_norm, run.amp,
                                             state.step + 1, run.anchor)
            state.step += 1
            step_tokens, step_trained = dist.sum_over_ranks(  # all ranks' tokens, one all-reduce
                (sum(real_count(b) for b in micro), sum(trained_count(b) for b in micro)))
            state.tokens += step_tokens
            state.trained_tokens += step_trained
            state.elapsed = run.elapsed()
            window.add(loss, kl, step_tokens)
            result.losses.append(loss)
            if state.step % tc.log_every == 0 or state.step == run.total_steps:
                mean, tps = sum(window.losses) / len(window.losses), window.tokens_per_s()
                _log_train(run, state, stream, window, lr, grad_norm, mean, tps)
                bar.update(task, loss=f"{mean:.4f}", lr=f"{lr:.2e}", tps=f"{tps:,.0f}")
                window.reset()
            bar.update(task, completed=state.step)
            if state.step < run.total_steps and _between_steps(run, state, stream):
                break


def _log_train(run: Run, state: TrainState, stream: BatchStream, window: LogWindow, lr: float, grad_norm: float,
               mean: float, tps: float) -> None:
    """A `train` event: the window's mean loss (and KL), throughput, memory."""
    if not run.log:
        return
    run.log.write("train", step=state.step, epoch=round(stream.epoch + stream.index / max(1, len(stream)), 4),
                  loss=mean, lr=lr, grad_norm=grad_norm, tokens=state.tokens,
                  trained_tokens=state.trained_tokens, tokens_per_s=round(tps, 2),
                  elapsed=round(state.elapsed, 3), rss_mb=_mb(rss_mb()), peak_rss_mb=_mb(peak_rss_mb()),
                  **_cuda_memory(run.device), **({"kl": sum(window.kls) / len(window.kls)} if window.kls else {}))


def _between_steps(run: Run, state: TrainState, stream: BatchStream) -> bool:
    """The evaluations and checkpoint due after this step (not the last); True when early stopping ends the run."""
    tc, step = run.cfg.train, state.step
    if tc.eval_every and step % tc.eval_every == 0:
        _eval_and_keep_best(run, state)
    if run.cfg.eval.every and step % run.cfg.eval.every == 0:
        gen = _generation_eval(run, step)
        if run.stopper is not None and _early_stop(run, gen, step):
            return True
    if tc.save_every and step % tc.save_every == 0:  # every rank: FSDP gathers
        _save_checkpoint(run, state, stream)
    return False


def _save_checkpoint(run: Run, state: TrainState, stream: BatchStream) -> None:
    """checkpoints/step-N/ with the state as it stands (data position and early-stop state brought up to date)."""
    state.epoch, state.batch_index = stream.epoch, stream.index
    state.early_stop = run.stopper.state() if run.stopper is not None else None
    save_checkpoint(run.run_dir, state.step, run.model, run.optimizer, state.fields(), run.cfg.train.keep_checkpoints,
                    run.meta, run.cfg.model.name)


def finish(run: Run, state: TrainState, stream: BatchStream, result: TrainResult) -> None:
    """Final evaluation, the adapter (or model), a last checkpoint, eval.json, the end event and report.html."""
    final_eval = _eval_and_keep_best(run, state)
    if run.frozen is not None:
        result.frozen_replays = run.frozen.hits
        run.frozen.remove()  # the model is an ordinary model again
    if run.attention_undo is not None:
        run.attention_undo()
    for hook in run.norm_hooks:
        hook.remove()
    stopper = run.stopper
    if run.cfg.eval.every and not (stopper is not None and stopper.stopped):  # a stopped run was just evaluated
        gen = _generation_eval(run, state.step)
        if stopper is not None:
            _keep_best_generation(run, gen, state.step)
    result.eval_loss, result.tokens, result.trained_tokens = final_eval, state.tokens, state.trained_tokens
    result.elapsed = state.elapsed = run.elapsed()
    result.peak_rss_mb = peak_rss_mb()
    dist.on_main(run.model, _save_final, run)  # every rank: FSDP gathers, rank 0 writes
    _save_checkpoint(run, state, stream)
    if dist.is_main():
        if stopper is not None:
            result.early_stopped_at, result.best_step = stopper.stopped_at, stopper.best_step
        _write_summary(run, state, result)


def _write_summary(run: Run, state: TrainState, result: TrainResult) -> None:
    """eval.json, the `end` event, report.html and the closing lines (rank 0)."""
    best, final_eval, stopper = state.best_eval_loss, result.eval_loss, run.stopper
    summary = {
        "step": state.step, "eval_loss": final_eval,
        "eval_ppl": math.exp(final_eval) if final_eval is not None else None,
        "best_eval_loss": best if math.isfinite(best) else None,
        "train_loss_last": result.losses[-1] if result.losses else None, "tokens": state.tokens,
        "trained_tokens": state.trained_tokens, "elapsed_s": round(result.elapsed, 2),
        "trained_tokens_per_s": round(state.trained_tokens / max(result.elapsed, 1e-9), 2),
        "peak_rss_mb": result.peak_rss_mb, "frozen_block_replays": result.frozen_replays,
    }
    if stopper is not None:
        summary.update(early_stopped_at=stopper.stopped_at, best_step=stopper.best_step,
                       best_metric=stopper.metric, best_value=stopper.best)
    atomic_write_text(run.run_dir / "eval.json", json.dumps(summary, indent=2) + "\n")
    if run.log:
        run.log.write("end", **summary)
        run.log.close()
    _write_report(run.run_dir, run.console)
    if final_eval is not None:
        run.console.print(f"eval loss {final_eval:.4f}, perplexity {math.exp(final_eval):.2f}")
    run.console.print(f"wrote {run.run_dir} ({state.step} steps, {state.trained_tokens:,} trained tokens, "
                      f"{result.elapsed:.1f} s)")


def _mb(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _cuda_memory(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    return {"cuda_peak_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}


def _write_report(run_dir: Path, console: Any) -> None:
    """report.html; the run's results are already saved, so a failure here is a warning, not a lost run."""
    from lorakit.eval.report import write_report

    try:
        write_report(run_dir)
    except Exception as err:  # noqa: BLE001 - see the docstring; `lorakit report RUN_DIR` retries it
        console.print(f"[yellow]warning:[/yellow] report.html not written ({type(err).__name__}: {err}); "
                      f"retry with: lorakit report {run_dir}")


def _generation_eval(run: Run, step: int) -> dict[str, Any] | None:
    """Generation metrics on the first eval rows (config `eval:`), logged as a gen_eval event."""
    from lorakit.eval.during_training import generation_eval

    result = generation_eval(run.model, run.tokenizer, run.cfg, run.data.eval)  # every rank: FSDP forwards are collective
    if result is None:
        return None
    if run.log:
        run.log.write("gen_eval", step=step, n=result["n"], metrics=result["metrics"])
    shown = ", ".join(f"{k} {v:.3f}" for k, v in result["metrics"].items() if v is not None)
    run.console.print(f"step {step}: generation eval on {result['n']} rows: {shown}")
    return result


def _early_stopper(cfg: Config, examples: list[Any]) -> EarlyStop | None:
    """train.early_stop's tracker, after checking that its metric can be scored on the eval rows."""
    if cfg.train.early_stop is None:
        return None
    from lorakit.eval.during_training import generation_rows

    check_rows(cfg.train.early_stop.metric, [target for _, target in generation_rows(cfg, examples)])
    return EarlyStop(cfg.train.early_stop.metric, cfg.train.early_stop.patience)


def _keep_best_generation(run: Run, result: dict[str, Any] | None, step: int) -> None:
    """Record a generation eval in run.stopper; a new best is saved as adapter-best/ (step and value in lorakit.json)."""
    stopper, model = run.stopper, run.model
    value = None if result is None else result["metrics"].get(stopper.metric)
    if value is not None:  # the ranks' mean, so every rank takes the same decision
        value = dist.sum_over_ranks(float(value)) / dist.world_size()
    if stopper.update(step, value) and has_adapter(model):  # every rank: FSDP gathers
        dist.on_main(model, save_trained, model, run.run_dir / "adapter-best", run.cfg.model.name,
                     dict(run.meta, step=step, best_metric=stopper.metric, best_value=value))


def _early_stop(run: Run, result: dict[str, Any] | None, step: int) -> bool:
    """After a generation eval during training: keep the best; True (stop) after `patience` evals without one."""
    stopper = run.stopper
    _keep_best_generation(run, result, step)
    if not stopper.patience_spent:
        return False
    stopper.stopped_at = step
    best = "none" if stopper.best is None else f"{stopper.best:.4f} at step {stopper.best_step}"
    if run.log:
        run.log.write("early_stop", step=step, metric=stopper.metric, best_step=stopper.best_step,
                      best_value=stopper.best, patience=stopper.patience)
    run.console.print(f"early stop at step {step}: {stopper.metric} did not improve for {stopper.patience} generation "
                      f"eval(s); best {best} (adapter-best/)")
    return True


def _eval_and_keep_best(run: Run, state: TrainState) -> float | None:
    """Evaluate; log eval loss and perplexity; a new best goes into state.best_eval_loss and its adapter into
    adapter-best/ (by the generation metric instead, in _keep_best_generation, with train.early_stop).

    Returns this evaluation's loss (None without eval batches).
    """
    model, step = run.model, state.step
    loss = evaluate(model, run.loss_fn, run.eval_batches, run.amp) if run.eval_batches else None
    if loss is None:
        return None
    if run.log:
        run.log.write("eval", step=step, eval_loss=loss, eval_ppl=math.exp(min(loss, 50.0)))
    if loss < state.best_eval_loss:
        state.best_eval_loss = loss
        if run.cfg.train.early_stop is None and has_adapter(model):  # every rank: FSDP gathers
            dist.on_main(model, save_trained, model, run.run_dir / "adapter-best", run.cfg.model.name,
                         dict(run.meta, step=step, eval_loss=loss))
    return loss


def _save_final(run: Run) -> None:
    """adapter/ (LoRA, prompt tuning) or model/ (full fine-tuning: a whole HF model with its tokenizer); rank 0."""
    model, run_dir = run.model, run.run_dir
    if has_adapter(model):
        save_trained(model, run_dir / "adapter", run.cfg.model.name, run.meta)
        return
    from lorakit.adapters.state import require_finite
    from lorakit.io import atomic_dir

    require_finite({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}, f"model {run_dir / 'model'}")
    with atomic_dir(run_dir / "model", overwrite=True) as tmp:  # full fine-tuning: a whole HF model
        model.save_pretrained(tmp)
        run.tokenizer.save_pretrained(tmp)
