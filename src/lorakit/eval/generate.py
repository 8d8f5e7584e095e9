"""Generation with the exact prompt rendering used in training.

The prompt comes from `lorakit.data.templates.render_prompt`, the function that also
decides which characters training puts its loss on, so a model tuned by lorakit is always
asked in the format it learned. Decoding is transformers' `generate` (KV cache, batched with
left padding): greedy when temperature is 0, else sampling with temperature and top-p from
a seeded generator. Generation stops at EOS, at the template's end-of-turn token, or at any
of the given stop strings (which are cut from the answer).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import LorakitError

Message = dict[str, str]


@dataclass
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise LorakitError(f"max new tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise LorakitError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LorakitError(f"top-p must be in (0, 1], got {self.top_p}")


@dataclass
class InferenceModel:
    model: nn.Module
    tokenizer: Any
    template: str = "auto"
    system_prompt: str | None = None
    name: str = ""
    adapter: str | None = None


def load_for_inference(
    model: str | None,
    adapter: str | Path | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> InferenceModel:
    """Base model (+ adapter, on the same quantized base it was trained on), in eval mode.

    The adapter's lorakit.json supplies the template and system prompt used in training.
    """
    from lorakit.adapters import load_adapter
    from lorakit.adapters.state import LORAKIT_META, read_adapter_config
    from lorakit.models.load import load_model
    from lorakit.models.quantized import QuantSpec

    meta: dict[str, Any] = {}
    spec = None
    if adapter is not None:
        config = read_adapter_config(adapter)
        meta_path = Path(adapter) / LORAKIT_META
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = {}
        model = model or config.get("base_model_name_or_path")
        q = meta.get("quantization")
        if q:
            compute = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(q.get("compute_dtype"), torch.float32)
            spec = QuantSpec(q["method"], int(q.get("blocksize", 64)), bool(q.get("double_quant", True)), compute)
    if not model:
        raise LorakitError("give --model (the adapter does not record its base model)")
    loaded = load_model(model, dtype, device, trust_remote_code, quantization=spec)
    if adapter is not None:
        load_adapter(loaded.model, adapter)
    loaded.model.eval()
    template = meta.get("template") or "auto"
    return InferenceModel(loaded.model, loaded.tokenizer, template, meta.get("system_prompt"), model,
                          None if adapter is None else str(adapter))


def prompt_text(messages: Sequence[Message] | str, im: InferenceModel, system_prompt: str | None = None) -> str:
    """What the model sees before its answer: the training template's rendering of `messages`."""
    from lorakit.data.templates import render_prompt

    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return render_prompt(messages, im.template, im.tokenizer, system_prompt or im.system_prompt)


def stop_token_ids(im: InferenceModel) -> list[int]:
    from lorakit.data.templates import end_of_turn

    ids = set()
    if im.tokenizer.eos_token_id is not None:
        ids.add(int(im.tokenizer.eos_token_id))
    try:
        eot = end_of_turn(im.template, im.tokenizer)
        eot_ids = im.tokenizer(eot, add_special_tokens=False)["input_ids"]
        if len(eot_ids) == 1:
            ids.add(int(eot_ids[0]))
    except Exception:  # noqa: BLE001 - a template without a single-token end of turn stops on EOS alone
        pass
    return sorted(ids)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]


@torch.no_grad()
def generate(
    im: InferenceModel,
    prompts: Sequence[Sequence[Message] | str],
    settings: GenerationSettings | None = None,
    batch_size: int = 8,
    system_prompt: str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Answers to `prompts` (chat message lists or plain user texts), in order."""
    settings = settings or GenerationSettings()
    settings.check()
    tok = im.tokenizer
    texts = [prompt_text(p, im, system_prompt) for p in prompts]
    device = next(im.model.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    eos = stop_token_ids(im)
    outputs: list[str] = []
    for start in range(0, len(texts), batch_size):  # rows left-padded by _encode
        chunk = texts[start : start + batch_size]
        enc = _encode(im, chunk, pad_id, device)
        kwargs: dict[str, Any] = dict(max_new_tokens=settings.max_new_tokens, eos_token_id=eos or None,
                                      pad_token_id=pad_id, use_cache=True)
        if settings.temperature > 0:
            torch.manual_seed(settings.seed + start)
            kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if settings.stop:
            kwargs.update(stop_strings=list(settings.stop), tokenizer=tok)
        out = im.model.generate(**enc, **kwargs)  # (b, prompt + new)
        new = out[:, enc["input_ids"].shape[1]:]
        for row in new:
            text = tok.decode(row, skip_special_tokens=True)
            outputs.append(cut_at_stop(text, settings.stop).strip())
        if on_batch:
            on_batch(len(chunk))
    return outputs


SHARED_PREFIX_MIN = 16  # tokens; below this, sharing saves less than it costs


def _common_prefix(ids: Sequence[Sequence[int]]) -> int:
    n = min(len(x) for x in ids) - 1  # every row keeps at least one token of its own
    p = 0
    while p < n and all(x[p] == ids[0][p] for x in ids):
        p += 1
    return p


def _encode(im: InferenceModel, texts: Sequence[str], pad_id: int, device: torch.device) -> dict[str, Any]:
    """generate() inputs; a prefix all prompts share (the system prompt) is run once, not once per row.

    The shared prefix goes through the model for one row and its KV cache is repeated for the
    batch; each row's own tokens are left-padded after it, and the attention mask hides the pad
    (generate() derives positions from the mask, so they stay contiguous). Greedy output equals
    the plain left-padded batch (tested). Evaluation prompts share a system prompt that is often
    most of their tokens, so this cuts the prefill by about that share.
    """
    from transformers import DynamicCache

    ids = [im.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    p = _common_prefix(ids) if len(ids) > 1 else 0
    if p < SHARED_PREFIX_MIN:
        rows = ids
        p = 0
    else:
        rows = [x[p:] for x in ids]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([ids[0][:p] + [pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[1] * p + [0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    enc: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
    if p:
        cache = DynamicCache(config=im.model.config)
        with torch.no_grad():
            im.model(input_ids=input_ids[:1, :p], past_key_values=cache, use_cache=True)
        cache.batch_repeat_interleave(len(rows))
        enc["past_key_values"] = cache
    return enc


def stream_reply(im: InferenceModel, messages: Sequence[Message], settings: GenerationSettings,
                 write: Callable[[str], None]) -> str:
    """Generate one answer to the conversation, passing text pieces to `write` as they come."""
    from threading import Thread

    from transformers import TextIteratorStreamer

    settings.check()
    tok = im.tokenizer
    text = prompt_text(messages, im)
    enc = tok(text, return_tensors="pt", add_special_tokens=False).to(next(im.model.parameters()).device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    kwargs: dict[str, Any] = dict(max_new_tokens=settings.max_new_tokens, eos_token_id=stop_token_ids(im) or None,
                                  pad_token_id=tok.pad_token_id, streamer=streamer, use_cache=True)
    if settings.temperature > 0:
        torch.manual_seed(settings.seed)
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                im.model.generate(**enc, **kwargs)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)
            streamer.end()

    thread = Thread(target=run, daemon=True)
    thread.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        shown = cut_at_stop("".join(pieces), settings.stop)
        if settings.stop and len(shown) < len("".join(pieces)):
            break
        write(piece)
    thread.join()
    if errors:
        raise errors[0]
    return cut_at_stop("".join(pieces), settings.stop).strip()
