"""Scale-out on torch.distributed: DDP and FSDP2 under torchrun, and the rank-0-only rule.

A single process goes through the same functions, which then do nothing, so the loop has
one code path. Under torchrun (`torchrun --nproc_per_node N -m lorakit train CONFIG`, or
`lorakit train CONFIG --nproc N`, which starts torchrun):

- `setup` joins the process group (NCCL on CUDA, gloo on CPU) and puts each rank on its
  own GPU (cuda:LOCAL_RANK).
- Data: rank k of n takes the k-th contiguous slice of every global batch of
  batch_size x n rows (`make_batches(part=...)`), so the n ranks together see exactly the
  rows one process sees with batch_size x n, and the global batch of a step is
  batch_size x grad_accum x world_size.
- Loss: the step's trained-token count is summed over ranks before backward and each rank
  scales its loss sum by world_size / that count; DDP and FSDP average gradients over
  ranks, so the gradient is that of the mean over every trained token of the step, as in
  one process.
- `parallelize` wraps the model with its loss in one module (`_LossModule`), so the
  forward that DDP and FSDP hook is the whole loss computation, chunked head included.
  DDP reduces only the parameters that train (the adapters), with `no_sync` on all but the
  last micro-batch. FSDP2 `fully_shard`s each decoder layer and the root; the frozen
  quantized weights of QLoRA (NF4 codes, block scales) become frozen parameters sharded on
  dim 0 in their own FSDP groups that gather them exactly as stored (no bf16 cast), and
  each layer dequantizes after the all-gather. Calling the unwrapped model directly (the
  generation eval) gathers the root's parameters through a forward pre-hook.
- Saving: `full_parameters` gathers sharded trainable parameters (every rank takes part)
  and swaps full CPU copies in on rank 0 alone, which writes; optimizer state is gathered
  the same way, so a checkpoint has the single-process layout whatever the strategy.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.quant.linear import QuantizedLinear

T = TypeVar("T")
_state: dict[str, Any] = {"owned": False, "device": torch.device("cpu"), "fsdp_roots": []}


# ----------------------------------------------------------------------------- who am I


def launched() -> bool:
    """Started by torchrun (or anything that sets its environment variables)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if _initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return torch.distributed.get_world_size() if _initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Only rank 0 prints, logs and writes files."""
    return rank() == 0


# ----------------------------------------------------------------------------- set-up


def setup(cfg: Any, device: torch.device) -> torch.device:
    """Join the process group when launched by torchrun; return this rank's device.

    `cfg` is the config's `distributed` section. Ends with a barrier, so no rank writes into
    the run directory before every rank has checked it.
    """
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise LorakitError("distributed.backend nccl needs CUDA GPUs; use distributed.backend: gloo (or auto) on CPU")
    if not _initialized():
        torch.distributed.init_process_group(
            backend, timeout=timedelta(seconds=cfg.timeout_s), device_id=device if device.type == "cuda" else None
        )
        _state["owned"] = True
    _state["device"] = device
    barrier()
    return device


def barrier() -> None:
    if _initialized():
        torch.distributed.barrier()


def teardown() -> None:
    """Leave the process group this module joined (after a barrier, so ranks end together)."""
    if _initialized() and _state["owned"]:
        barrier()
        torch.distributed.destroy_process_group()
        _state["owned"] = False


class PeerFailed(LorakitError):
    """This rank stopped because another rank died; that rank's own error is the one to read."""

    exit_code = 1


_PEER_GONE = ("closed by peer", "reset by peer", "Broken pipe", "Connection refused")


@contextlib.contextmanager
def job() -> Iterator[None]:
    """Around a command: errors name the rank that raised them; a clean exit leaves the group.

    A rank that fails exits (error shown, exit code 2 for user errors). The others fail at
    their next collective as soon as the connection drops (gloo), or are stopped by torchrun
    when it sees the exit; `distributed.timeout_s` is the backstop. Their consequential
    error is one line instead of a traceback.
    """
    try:
        yield
    except LorakitError as err:
        if world_size() > 1 and not str(err).startswith("rank "):
            raise LorakitError("\n".join(f"rank {rank()}: {line}" for line in str(err).splitlines())) from None
        raise
    except RuntimeError as err:
        peer_gone = isinstance(err, torch.distributed.DistError) or any(s in str(err) for s in _PEER_GONE)
        if world_size() > 1 and peer_gone:
            raise PeerFailed(f"rank {rank()} stopped: another rank of the job failed; its error is shown above "
                             f"({str(err).splitlines()[0][:160]})") from None
        raise
    teardown()


def seed_ranks(seed: int) -> None:
    """Give each rank its own dropout stream (after the model is built identically everywhere)."""
    if world_size() > 1:
        torch.manual_seed(seed + 1_000_003 * (rank() + 1))


# ----------------------------------------------------------------------------- data


def rank_batches(items: Sequence, batch_size: int, pad_id: int, seed: int, epoch: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of `batch_size` rows: its slice of each global batch of batch_size x world_size."""
    from lorakit.data import make_batches

    n = world_size()
    return make_batches(items, batch_size * n, pad_id, seed, epoch, shuffle=True, part=(rank(), n))


# ----------------------------------------------------------------------------- collectives


def sum_over_ranks(value: T) -> T:
    """The sum of an int or float, or of each of a tuple of them, over all ranks, in one all-reduce
    (the value itself in a single process)."""
    if not _initialized():
        return value
    values = value if isinstance(value, tuple) else (value,)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_state["device"])
    torch.distributed.all_reduce(t)
    totals = tuple(int(round(x)) if isinstance(v, int) else x for v, x in zip(values, t.tolist()))
    return totals if isinstance(value, tuple) else totals[0]  # type: ignore[return-value]


def agree(value: int, what: str, fix: str) -> None:
    """Raise (naming `what`, each rank's value and the `fix`) when ranks hold different values."""
    if not _initialized():
        return
    values: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(values, value)
    if len(set(values)) > 1:
        seen = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise LorakitError(f"ranks disagree on {what} ({seen}); {fix}")


# ----------------------------------------------------------------------------- wrapping


class _LossModule(nn.Module):
    """model + loss function as one module, so DDP's and FSDP's forward hooks see the whole loss."""

    def __init__(self, model: nn.Module, loss_fn: Callable) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return self.loss_fn(self.model, batch)


class ParallelLoss:
    """A LossFn that runs the wrapped (DDP / FSDP) module; the model argument is the same model, unwrapped."""

    def __init__(self, wrapped: nn.Module, strategy: str) -> None:
        self.wrapped, self.strategy = wrapped, strategy

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return self.wrapped(batch)


def grad_sync(loss_fn: Any, last: bool) -> contextlib.AbstractContextManager:
    """DDP: no all-reduce on micro-batches before the last of a step (gradients accumulate locally).

    FSDP reduce-scatters every micro-batch, so gradients stay sharded between them.
    """
    if isinstance(loss_fn, ParallelLoss) and loss_fn.strategy == "ddp" and not last:
        return loss_fn.wrapped.no_sync()
    return contextlib.nullcontext()


def parallelize(model: nn.Module, loss_fn: Callable, cfg: Any, device: torch.device,
                amp_dtype: torch.dtype | None, optimizer_name: str = "adamw") -> Callable:
    """Wrap `model` for the configured strategy; return the loss function to train and evaluate with.

    Call after adapters, gradient checkpointing and compile are set up and before the
    optimizer is built (FSDP replaces the parameters by sharded ones).
    """
    if not _initialized():
        return loss_fn
    _state["fsdp_roots"] = []
    root = _LossModule(model, loss_fn)
    if cfg.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # buffers (rotary tables, the NF4 codes of QLoRA) are the same on every rank: synced once, not per step
        return ParallelLoss(DistributedDataParallel(root, device_ids=ids, forward_sync_buffers=False), "ddp")
    if optimizer_name != "adamw":
        raise LorakitError(
            f"train.optimizer {optimizer_name} does not work on FSDP's sharded parameters; "
            "use train.optimizer: adamw with distributed.strategy: fsdp"
        )
    reduce_dtype = torch.bfloat16 if cfg.reduce_dtype == "bf16" else torch.float32
    shard_model(root, model, device, amp_dtype, reduce_dtype)
    return ParallelLoss(root, "fsdp")


def decoder_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The decoder layers: the model's largest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len) if lists else None


def quantized_buffers_to_parameters(module: nn.Module) -> list[str]:
    """Turn a quantized linear's persistent buffers of dim >= 1 into frozen parameters, in place.

    FSDP shards parameters and replicates buffers; as frozen parameters the NF4 codes and
    block scales are split on dim 0 like any weight and all-gathered before the layer runs.
    Names (and state_dict keys) do not change; the 0-dim double-quant offset and the
    constant decode tables stay buffers (a few hundred bytes, replicated).
    """
    moved = []
    for name, buf in list(module._buffers.items()):
        if buf is None or buf.ndim == 0 or name in module._non_persistent_buffers_set:
            continue
        del module._buffers[name]
        module.register_parameter(name, nn.Parameter(buf, requires_grad=False))
        moved.append(name)
    return moved


def shard_model(root: nn.Module, model: nn.Module, device: torch.device, param_dtype: torch.dtype | None,
                reduce_dtype: torch.dtype) -> None:
    """FSDP2: quantized linears, then each decoder layer, then the root, each `fully_shard`ed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    mixed = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype if param_dtype else None)
    stored = MixedPrecisionPolicy()  # quantized codes and fp32 scales: gathered bit for bit
    for module in list(model.modules()):
        if isinstance(module, QuantizedLinear):
            quantized_buffers_to_parameters(module)
            fully_shard(module, mesh=mesh, mp_policy=stored)
    blocks = decoder_blocks(model)
    for block in blocks if blocks is not None else []:
        fully_shard(block, mesh=mesh, mp_policy=mixed)
    fully_shard(root, mesh=mesh, mp_policy=mixed)
    _state["fsdp_roots"] = [root]  # the model being trained (a later train() in this process replaces it)

    def gather_root_params(module: nn.Module, args: Any) -> None:
        # model(...) / model.generate(...) called directly (generation eval) bypasses the root's
        # hooks: gather its parameters (embeddings, norm, head) first; a no-op when gathered
        root.unshard()

    model.register_forward_pre_hook(gather_root_params)


# ----------------------------------------------------------------------------- gradients


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """The global gradient norm (over all shards under FSDP), clipping to `max_norm` when > 0."""
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return float(full_tensor(norm))


# ----------------------------------------------------------------------------- state


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value gathered whole; every rank must call this. Plain tensors pass through."""
    return t.full_tensor() if _is_dtensor(t) else t


def like_param(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `param`: this rank's shard when `param` is sharded (no communication)."""
    if not _is_dtensor(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Inside: on rank 0, every sharded trainable parameter is a full CPU copy; restored on exit.

    Every rank must enter (the gathers are collective, one parameter at a time, in module
    order); only rank 0 keeps the copies. Without FSDP this does nothing.
    """
    _reshard_all()  # e.g. the root's parameters stay gathered after an eval forward
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    copies: dict[int, nn.Parameter] = {}  # tied weights stay tied
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.requires_grad or not _is_dtensor(p):
                continue
            if id(p) not in copies:
                whole = p.full_tensor().detach()
                copies[id(p)] = nn.Parameter(whole.cpu(), requires_grad=True) if is_main() else p
            if is_main():
                swapped.append((module, name, p))
                module._parameters[name] = copies[id(p)]
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


def _reshard_all() -> None:
    from torch.distributed.fsdp import FSDPModule

    for root in _state["fsdp_roots"]:
        for module in root.modules():
            if isinstance(module, FSDPModule):
                module.reshard()


def on_main(model: nn.Module, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Run `fn` on rank 0 with the model's trainable parameters whole; every rank must call this."""
    with full_parameters(model):
        return fn(*args, **kwargs) if is_main() else None


def gather_rng(tensors: dict[str, torch.Tensor], py_state: Any) -> tuple[dict[str, torch.Tensor], list[Any]]:
    """Every rank's RNG states for a checkpoint: rank 0's keys as they are, rank r's as `rank{r}.KEY`.

    Returns (tensors, python states by rank). Every rank must call this.
    """
    if not _initialized() or world_size() == 1:
        return tensors, [py_state]
    gathered: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(gathered, (tensors, json.dumps(py_state)))
    out: dict[str, torch.Tensor] = {}
    states = []
    for r, (ts, py) in enumerate(gathered):
        out.update({(k if r == 0 else f"rank{r}.{k}"): v for k, v in ts.items()})
        states.append(json.loads(py))
    return out, states


def rank_rng(tensors: dict[str, torch.Tensor], py_states: list[Any]) -> tuple[dict[str, torch.Tensor], Any]:
    """This rank's RNG states from a checkpoint written by `gather_rng`."""
    r = rank()
    if r == 0 or not any(k.startswith(f"rank{r}.") for k in tensors):
        return {k: v for k, v in tensors.items() if not k.startswith("rank")}, py_states[0]
    prefix = f"rank{r}."
    mine = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return mine, py_states[min(r, len(py_states) - 1)]


# ----------------------------------------------------------------------------- launching


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m lorakit ARGV` as `nproc` ranks on this machine through torchrun; its exit code.

    Single node only (torchrun --standalone picks a free port); for several nodes run torchrun
    yourself (README, "Distributed training"). On CPU each rank gets cores / nproc threads
    unless OMP_NUM_THREADS is set.
    """
    if nproc < 1:
        raise LorakitError(f"--nproc must be >= 1, got {nproc}")
    if launched():
        raise LorakitError("--nproc starts torchrun itself; under torchrun, leave --nproc out")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    runner = "import sys; from lorakit.train.distributed import torchrun_main; torchrun_main(sys.argv[1:])"
    cmd = [sys.executable, "-c", runner, "--standalone", f"--nproc-per-node={nproc}", "-m", "lorakit", *argv]
    return subprocess.run(cmd, env=env).returncode


def torchrun_main(args: list[str]) -> None:
    """torchrun with a short failure summary (rank: exit code) instead of its own traceback."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(args))
    except ChildFailedError as err:
        for r, failure in sorted(err.failures.items()):
            code = failure.exitcode
            how = f"signal {-code}, stopped by torchrun" if code < 0 else f"exit code {code}"
            sys.stderr.write(f"rank {r}: {how}\n")
        sys.exit(1)
