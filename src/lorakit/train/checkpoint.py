"""Resumable checkpoints: safetensors and JSON only, written atomically.

    checkpoints/step-N/
      trainable.safetensors   every trainable parameter, by name (the resume source of truth)
      adapter/                the LoRA adapter in PEFT's format (usable on its own)
      optimizer.safetensors   optimizer state tensors, keyed state.<param index>.<name>
      optimizer.json          optimizer param groups (hyper-parameters)
      rng.safetensors         torch CPU (and CUDA) generator states (rank r > 0 of a torchrun job: rank{r}.*)
      trainer_state.json      step, data position, best eval loss, Python RNG state, world size, ...

Under torchrun every rank calls save_checkpoint: FSDP's sharded parameters and optimizer
state are gathered and rank 0 writes them whole, so the layout is the same for 1 process,
DDP and FSDP; a run resumes with the world size it was written with.

Nothing is unpickled on load. A directory appears only when complete (temp dir, every file
and directory fsynced, then the rename), so a SIGKILL or power loss during a save leaves the
previous checkpoint as the latest. Resume reads and validates the newest checkpoint and falls
back to the previous valid one, with a warning naming what was wrong.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.adapters.methods import has_adapter, save_trained
from lorakit.adapters.state import require_finite
from lorakit.errors import LorakitError
from lorakit.io import atomic_dir, atomic_write_text
from lorakit.train.distributed import (full_parameters, full_tensor, gather_rng, is_main, like_param, rank_rng,
                                       world_size)

_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """Where a run stands: what trainer_state.json holds besides the RNG states and world size.

    The weights, optimizer state and RNG states are read from the live objects when a
    checkpoint is saved and written to them on resume (`load_checkpoint`); this is the rest.
    """

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the data position: epoch and micro-batch index within it (BatchStream)
    batch_index: int = 0
    best_eval_loss: float = math.inf
    tokens: int = 0  # all ranks' tokens so far (padding excluded)
    trained_tokens: int = 0  # of which carried loss
    elapsed: float = 0.0  # training seconds, over every resume
    early_stop: dict[str, Any] | None = None  # EarlyStop.state() with train.early_stop

    def fields(self) -> dict[str, Any]:
        """The trainer_state.json fields, in their on-disk order (save_checkpoint adds step, RNG, world size)."""
        out = asdict(self)
        del out["step"]
        return out

    @classmethod
    def read(cls, state: dict[str, Any]) -> TrainState:
        """From a trainer_state.json dict (`load_checkpoint`'s result); keys an older lorakit did not write default."""
        return cls(step=state["step"], epoch=state["epoch"], batch_index=state["batch_index"],
                   best_eval_loss=state.get("best_eval_loss", math.inf), tokens=state.get("tokens", 0),
                   trained_tokens=state.get("trained_tokens", 0), elapsed=state.get("elapsed", 0.0),
                   early_stop=state.get("early_stop"))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state as whole tensors (FSDP's shards gathered: every rank calls this; only rank 0 keeps them)."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = full_tensor(value) if isinstance(value, torch.Tensor) else torch.tensor(value)
            if is_main():
                tensors[f"state.{idx}.{key}"] = t.detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        param = params[int(idx)] if int(idx) < len(params) else None
        if param is not None and value.shape == param.shape:
            value = like_param(param, value)  # this rank's shard under FSDP
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, torch.Tensor], Any]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return tensors, random.getstate()


def restore_rng(tensors: dict[str, torch.Tensor], py_state: Any) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = py_state
    random.setstate((version, tuple(internal), gauss))


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep: int,
    adapter_meta: dict[str, Any] | None = None,
    base_model: str | None = None,
) -> Path:
    """Every rank calls this (FSDP's shards and every rank's RNG state are gathered); rank 0 writes."""
    target = Path(run_dir) / "checkpoints" / f"step-{step}"
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    rng_tensors, py_rngs = gather_rng(*rng_state())
    with full_parameters(model):
        if is_main():
            _write_checkpoint(target, step, model, opt_tensors, opt_meta, rng_tensors, py_rngs, trainer_state,
                              adapter_meta, base_model)
    if is_main():
        for _, old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _write_checkpoint(target: Path, step: int, model: nn.Module, opt_tensors: dict[str, torch.Tensor],
                      opt_meta: dict[str, Any], rng_tensors: dict[str, torch.Tensor], py_rngs: list[Any],
                      trainer_state: dict[str, Any], adapter_meta: dict[str, Any] | None, base_model: str | None) -> None:
    py_rng = py_rngs[0]
    weights = trainable_state(model)
    require_finite(weights, f"not writing checkpoint {target}")
    require_finite(opt_tensors, f"not writing checkpoint {target} (optimizer state)")
    with atomic_dir(target, overwrite=True) as tmp:
        save_file(weights, str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        atomic_write_text(tmp / "optimizer.json", json.dumps(opt_meta) + "\n")
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        state = dict(trainer_state, step=step, python_rng=py_rng, world_size=world_size())
        if len(py_rngs) > 1:
            state["python_rng_by_rank"] = py_rngs
        atomic_write_text(tmp / "trainer_state.json", json.dumps(state, indent=1) + "\n")
        if has_adapter(model):
            save_trained(model, tmp / "adapter", base_model, meta=adapter_meta)


class DamagedCheckpoint(LorakitError):
    """A checkpoint directory that cannot be resumed from (truncated, corrupt, incomplete)."""


@dataclass
class CheckpointFiles:
    """One checkpoint directory read whole and checked, before anything is applied to a model."""

    path: Path
    weights: dict[str, torch.Tensor]
    opt_tensors: dict[str, torch.Tensor]
    opt_meta: dict[str, Any]
    rng: dict[str, torch.Tensor]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


_STATE_KEYS = ("step", "epoch", "batch_index", "python_rng")


def read_checkpoint(path: Path) -> CheckpointFiles:
    """Read and validate `path`; raises DamagedCheckpoint naming what is wrong."""
    path = Path(path)
    try:
        weights = load_file(str(path / "trainable.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
        opt_meta = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
        rng = load_file(str(path / "rng.safetensors"))
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, SafetensorError) as err:  # JSON and UTF-8 errors are ValueErrors
        raise DamagedCheckpoint(f"checkpoint {path} is damaged ({_one_line(err)})") from err
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise DamagedCheckpoint(f"checkpoint {path}: trainer_state.json has no {missing[0]!r}")
    if not isinstance(opt_meta, dict) or not isinstance(opt_meta.get("param_groups"), list):
        raise DamagedCheckpoint(f"checkpoint {path}: optimizer.json has no param_groups list")
    if "torch_cpu" not in rng:
        raise DamagedCheckpoint(f"checkpoint {path}: rng.safetensors has no torch_cpu state")
    if not weights:
        raise DamagedCheckpoint(f"checkpoint {path}: trainable.safetensors holds no tensors")
    if any(not re.fullmatch(r"state\.\d+\.\w+", k) for k in opt_tensors):
        raise DamagedCheckpoint(f"checkpoint {path}: optimizer.safetensors has unexpected keys")
    try:
        require_finite(weights, f"checkpoint {path}", "it cannot be resumed from")
        require_finite(opt_tensors, f"checkpoint {path} (optimizer state)", "it cannot be resumed from")
    except LorakitError as err:
        raise DamagedCheckpoint(str(err)) from err
    return CheckpointFiles(path, weights, opt_tensors, opt_meta, rng, state)


def _one_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def newest_usable_checkpoint(run_dir: Path, warn: Callable[[str], None]) -> CheckpointFiles | None:
    """The newest checkpoint that reads and validates; each damaged newer one is reported via `warn`.

    None when the run has no checkpoint; a LorakitError when it has some and none is usable.
    """
    found = list_checkpoints(run_dir)
    problems = []
    for _, path in reversed(found):
        try:
            ckpt = read_checkpoint(path)
        except DamagedCheckpoint as err:
            problems.append(str(err))
            warn(f"{err}; trying the previous checkpoint")
            continue
        return ckpt
    if problems:
        raise LorakitError(
            f"no usable checkpoint in {Path(run_dir) / 'checkpoints'}: " + "; ".join(problems)
            + ". Start the run again in a new output_dir (or delete the checkpoints directory)"
        )
    return None


def load_checkpoint(path: Path | CheckpointFiles, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore trainable weights, optimizer and RNG from a checkpoint; return the trainer state."""
    ckpt = path if isinstance(path, CheckpointFiles) else read_checkpoint(path)
    path, weights, state = ckpt.path, ckpt.weights, dict(ckpt.state)
    if state.get("world_size", 1) != world_size():
        raise LorakitError(
            f"checkpoint {path} was written by {state.get('world_size', 1)} process(es) and this run has {world_size()}; "
            f"resume with the same number (--nproc {state.get('world_size', 1)}): the data position counts global batches"
        )
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing or any(n not in params for n in weights):
        raise LorakitError(
            f"checkpoint {path} does not fit this model/adapter config (e.g. {(missing or list(weights))[0]}); "
            "resume with the config the run was started with"
        )
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(like_param(params[name], value))
    restore_optimizer(optimizer, ckpt.opt_tensors, ckpt.opt_meta)
    restore_rng(*rank_rng(ckpt.rng, state.pop("python_rng_by_rank", None) or [state["python_rng"]]))
    state.pop("python_rng")
    return state
