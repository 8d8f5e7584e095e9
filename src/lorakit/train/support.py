"""What the device and the model support, found out before training starts.

The device and autocast dtype of train.device / train.precision; whether the model keeps
packed sequences apart by their position_ids (`packing_works`) and how it takes the 4D
shared-prefix mask (`prefix_mask_form`: boolean, additive or not at all). The probes run
the model itself on a few random tokens and compare with the sequences run alone.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.data.batching import to_device
from lorakit.errors import LorakitError
from lorakit.losses import LossFn
from lorakit.models.load import cpu_bf16_supported


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LorakitError(f"train.device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LorakitError(f"train.device is {name} but no CUDA GPU is available; use train.device: cpu")
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
    else:
        supported = cpu_bf16_supported()
    if precision == "bf16" and not supported:
        raise LorakitError(f"train.precision bf16 is not supported on this {device.type}; use fp32 or auto")
    return torch.bfloat16 if supported else None


@torch.no_grad()
def packing_works(model: nn.Module, device: torch.device) -> bool:
    """Two sequences packed with reset position_ids give the logits they give alone.

    The yardstick is the same pack run without the reset (the second sequence then sees the
    first): an isolating model stays far closer to the separate runs than that. A fixed
    tolerance would not do, because bf16 and 4-bit bases differ between a 12-token and a
    7-token forward by rounding alone (max 0.3-0.75 on SmolLM2 logits of size 35).
    """
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, vocab, (5,), generator=g), torch.randint(0, vocab, (7,), generator=g)
    packed = torch.cat([a, b])[None].to(device)
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None].to(device)
    was_training = model.training
    model.eval()
    try:
        together = model(input_ids=packed, position_ids=pos, use_cache=False).logits.float()  # (1, 12, V)
        crossing = model(input_ids=packed, use_cache=False).logits.float()  # no reset: b sees a
        alone = torch.cat(
            [model(input_ids=x[None].to(device), use_cache=False).logits.float() for x in (a, b)], dim=1
        )
    finally:
        model.train(was_training)
    return _isolates(together[0, 5:], crossing[0, 5:], alone[0, 5:])


def _isolates(got: torch.Tensor, crossing: torch.Tensor, alone: torch.Tensor) -> bool:
    """`got` (a packed run) matches `alone`, measured against `crossing` (the pack without isolation)."""
    err = float((got - alone).abs().mean())
    err_crossing = float((crossing - alone).abs().mean())
    return err <= 1e-4 * max(float(alone.abs().mean()), 1e-6) or err < 0.1 * err_crossing


@torch.no_grad()
def prefix_mask_form(model: nn.Module, device: torch.device) -> str | None:
    """How `model` takes the shared-prefix 4D mask: "bool", "float" (additive) or None (not at all).

    Two examples share a 4-token prefix in one row; each must give the logits it gives
    alone (by `packing_works`' yardstick). SDPA models take the boolean mask as is; eager
    attention adds the mask to the scores, so it needs the additive form; some kernels
    (flash-attention 2) take no 4D mask.
    """
    from lorakit.data.batching import make_batches
    from lorakit.data.packing import PackedSequence

    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    p, a, b = (torch.randint(0, vocab, (n,), generator=g).tolist() for n in (4, 3, 5))
    row = PackedSequence(p + a + b, [-100] * 12, list(range(4)) + list(range(4, 7)) + list(range(4, 9)), 2,
                         [0] * 4 + [1] * 3 + [2] * 5)
    batch = to_device(make_batches([row], 1, 0, 0, 0, shuffle=False)[0], device)
    was_training = model.training
    model.eval()
    try:
        alone = [model(input_ids=torch.tensor([p + x], device=device), use_cache=False).logits.float()[0, 4:]
                 for x in (a, b)]
        expected = torch.cat(alone)  # (8, V)
        crossing = model(input_ids=batch["input_ids"], use_cache=False).logits.float()[0, 4:]  # b sees a
        for form in ("bool", "float"):
            mask = batch["attention_mask"] if form == "bool" else additive_mask(batch["attention_mask"], model_dtype(model))
            try:
                got = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                            use_cache=False).logits.float()[0, 4:]
            except (RuntimeError, ValueError, TypeError):
                continue
            if _isolates(got, crossing, expected):
                return form
    finally:
        model.train(was_training)
    return None


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True = attend) as the additive form: 0 where allowed, the dtype's min elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point weights (fp32 for a quantized embedding)."""
    weight = model.get_input_embeddings().weight
    return weight.dtype if weight.dtype.is_floating_point else torch.float32


def with_additive_masks(loss_fn: LossFn, dtype: torch.dtype) -> LossFn:
    """`loss_fn` for a model that needs additive 4D masks: converts boolean ones on the way in."""

    def wrapped(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        mask = batch.get("attention_mask")
        if mask is not None and mask.dim() == 4 and mask.dtype == torch.bool:
            batch = {**batch, "attention_mask": additive_mask(mask, dtype)}
        return loss_fn(model, batch)

    return wrapped
