"""Generation with the exact prompt rendering used in training.

The prompt comes from `lorakit.data.templates.render_prompt`, the function that also
decides which characters training puts its loss on, so a model tuned by lorakit is always
asked in the format it learned. Decoding is our own KV-cached loop over left-padded batches
(`_decode`: finished rows leave the batch) for `generate`, and transformers' `generate` with a
streamer for `stream_reply`: greedy when temperature is 0, else sampling with temperature and
top-p from a seeded generator. Generation stops at EOS, at the template's end-of-turn token, or at any
of the given stop strings (which are cut from the answer).

A prompt-tuned model (adapters.prompt_tuning) gets its virtual tokens in front of every prompt
(`prompt_ids`): they are prefilled with the prompt into the KV cache, positions 0..n-1, as
PEFT's generate prepends them; all prompts of a batch share them, so `_encode` runs them once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.quant.linear import QuantizedLinear

if TYPE_CHECKING:
    from lorakit.adapters.state import BaseChoice

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
    model: str | BaseChoice | None,
    adapter: str | Path | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> InferenceModel:
    """Base model (+ adapter, on the same quantized base it was trained on), in eval mode.

    The adapter's lorakit.json supplies the template and system prompt used in training. `model`
    None: the base the adapter records, at its recorded commit, from the local cache only (a
    BaseChoice from adapters.state.base_model_of says the same for several adapters).
    """
    from lorakit.adapters.methods import load_any
    from lorakit.adapters.state import AdapterMeta, BaseChoice, base_model_of, read_adapter_meta
    from lorakit.models.load import load_model

    meta = AdapterMeta()
    if adapter is not None:
        meta = read_adapter_meta(adapter) or meta
    if isinstance(model, BaseChoice) or adapter is None:
        base = BaseChoice(model) if isinstance(model, str) else model
    else:
        base = base_model_of([adapter], model)
    spec = meta.quant_spec()  # the quantized base it was trained on, in its compute dtype
    if base is None:
        raise LorakitError("give --model (the adapter does not record its base model)")
    model = base.name
    loaded = load_model(model, dtype, device, trust_remote_code, base.revision, quantization=spec,
                        cache_only=base.cache_only)
    if adapter is not None:
        load_any(loaded.model, adapter)  # LoRA / DoRA, IA3, or a selective fine-tune's tensors
        _merge_if_exact(loaded.model)
    loaded.model.eval()
    template = meta.template or "auto"
    return InferenceModel(loaded.model, loaded.tokenizer, template, meta.system_prompt, model,
                          None if adapter is None else str(adapter))


def _merge_if_exact(model: nn.Module) -> None:
    """Fold LoRA into fp32 base weights for inference: one matmul per layer instead of three.

    Only where every adapted base is a plain fp32 weight: there W + B A differs from computing
    the two paths apart by fp32 rounding alone. A bf16 or quantized base stays unmerged, since
    rounding the merged weight to its dtype would evaluate another model. On the demo's tuned
    evaluation (LoRA r=32 on 126 layers) generation took 46-48 s merged against 51-57 s unmerged.
    """
    from lorakit.adapters.inject import lora_layers, merge_lora

    layers = [layer for _, layer in lora_layers(model)]
    if layers and all(not isinstance(l.base_layer, QuantizedLinear)
                      and getattr(l.base_layer, "weight", None) is not None
                      and l.base_layer.weight.dtype == torch.float32 for l in layers):
        merge_lora(model)


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


@dataclass
class Answer:
    text: str
    ended: bool
    """False when the answer ran to max_new_tokens without an end of turn, EOS or stop string."""


def generate(
    im: InferenceModel,
    prompts: Sequence[Sequence[Message] | str],
    settings: GenerationSettings | None = None,
    batch_size: int = 8,
    system_prompt: str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """Answers to `prompts` (chat message lists or plain user texts), in order."""
    return [a.text for a in generate_answers(im, prompts, settings, batch_size, system_prompt, on_batch)]


@torch.no_grad()
def generate_answers(
    im: InferenceModel,
    prompts: Sequence[Sequence[Message] | str],
    settings: GenerationSettings | None = None,
    batch_size: int = 8,
    system_prompt: str | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[Answer]:
    """`generate`, each answer with whether it ended or was cut at max_new_tokens.

    Prompts are batched by length (similar lengths share a batch, so left padding is small)
    into batches of about equal size, and decoded by `_decode`; answers come back in the
    order of `prompts`.
    """
    settings = settings or GenerationSettings()
    settings.check()
    if batch_size < 1:
        raise LorakitError(f"batch size must be >= 1, got {batch_size}")
    tok = im.tokenizer
    ids = [prompt_ids(im, prompt_text(p, im, system_prompt)) for p in prompts]
    device = next(im.model.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    eos = set(stop_token_ids(im))
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    n_batches = -(-len(ids) // batch_size) if ids else 0
    outputs: list[Answer] = [Answer("", True)] * len(ids)
    done = 0
    for b in range(n_batches):  # n_batches batches of equal size (+-1): 76 prompts at 64 -> 38 + 38, not 64 + 12
        chunk = order[done : done + (len(ids) - done) // (n_batches - b)]
        done += len(chunk)
        enc = _encode([ids[i] for i in chunk], pad_id, device, im.model)
        generator = None
        if settings.temperature > 0:
            generator = torch.Generator(device=device).manual_seed(settings.seed + b)
        rows = _decode(im.model, enc, settings, eos, generator, tok)
        for i, row in zip(chunk, rows):
            text = tok.decode(row, skip_special_tokens=True)
            answer = cut_at_stop(text, settings.stop)
            # a row stopped by EOS or end of turn holds fewer tokens than the limit (the stop token is not kept)
            ended = len(row) < settings.max_new_tokens or len(answer) < len(text)
            outputs[i] = Answer(answer.strip(), ended)
        if on_batch:
            on_batch(len(chunk))
    return outputs


def prompt_ids(im: InferenceModel, text: str) -> list[int]:
    """The token ids the model is given for a prompt text: its virtual tokens (prompt tuning), then the text's."""
    from lorakit.adapters.prompt_tuning import model_virtual_ids

    return model_virtual_ids(im.model) + list(im.tokenizer(text, add_special_tokens=False)["input_ids"])


def _decode(model: nn.Module, enc: dict[str, Any], settings: GenerationSettings, eos: set[int],
            generator: torch.Generator | None, tok: Any) -> list[list[int]]:
    """New token ids for each row of `enc` (greedy, or sampled with temperature and top-p).

    Our own loop rather than transformers' `generate`, for one reason: a row that has finished
    (end of turn, EOS, a stop string) leaves the batch, its KV cache rows dropped, so later
    steps compute only the rows still answering. `generate` keeps computing finished rows
    until the longest answer ends (on the demo's held-out set, tuned answers averaged 11.6 tokens,
    the longest 20). Only the last position's logits are
    computed (`logits_to_keep`), in the prefill too. Greedy output equals `generate`'s (tested).
    """
    from transformers import DynamicCache

    input_ids, mask = enc["input_ids"], enc["attention_mask"]
    cache = enc.get("past_key_values")
    if cache is None:
        cache = DynamicCache(config=model.config)
    cached = cache.get_seq_length()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = last_logits_only(model)
    active = torch.arange(input_ids.shape[0], device=input_ids.device)  # batch row -> output row
    out: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    step_ids, step_pos = input_ids[:, cached:], positions[:, cached:]
    for _ in range(settings.max_new_tokens):
        logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=cache,
                       use_cache=True, **extra).logits[:, -1, :].float()
        nxt = next_tokens(logits, settings, generator)
        finished = torch.zeros_like(nxt, dtype=torch.bool)
        for j, (row, token) in enumerate(zip(active.tolist(), nxt.tolist())):
            if token in eos:
                finished[j] = True
                continue
            out[row].append(token)
            if settings.stop and any(s in tok.decode(out[row], skip_special_tokens=True) for s in settings.stop if s):
                finished[j] = True
        if bool(finished.all()):
            break
        if bool(finished.any()):  # the finished rows leave the batch and its cache
            keep = (~finished).nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            active, nxt, mask, step_pos = active[keep], nxt[keep], mask[keep], step_pos[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        step_ids, step_pos = nxt.unsqueeze(1), step_pos[:, -1:] + 1
    return out


def last_logits_only(model: nn.Module) -> dict[str, int]:
    """forward() kwargs for logits at the last position only, where the model supports it."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def next_tokens(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None) -> torch.Tensor:
    if settings.temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    if settings.top_p < 1:  # nucleus: the smallest set of most likely tokens whose mass reaches top_p
        sorted_probs, index = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= settings.top_p  # mass before this token already enough
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, index, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


SHARED_PREFIX_MIN = 16  # tokens; below this, sharing saves less than it costs


def _common_prefix(ids: Sequence[Sequence[int]]) -> int:
    n = min(len(x) for x in ids) - 1  # every row keeps at least one token of its own
    p = 0
    while p < n and all(x[p] == ids[0][p] for x in ids):
        p += 1
    return p


def _encode(ids: Sequence[Sequence[int]], pad_id: int, device: torch.device, model: nn.Module) -> dict[str, Any]:
    """generate() inputs; a prefix all prompts share (the system prompt) is run once, not once per row.

    The shared prefix goes through the model for one row and its KV cache is repeated for the
    batch; each row's own tokens are left-padded after it, and the attention mask hides the pad
    (`_decode` derives positions from the mask, so they stay contiguous). Greedy output equals
    the plain left-padded batch (tested). Evaluation prompts share a system prompt that is often
    most of their tokens, so this cuts the prefill by about that share.
    """
    from transformers import DynamicCache

    ids = [list(x) for x in ids]
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
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=input_ids[:1, :p], past_key_values=cache, use_cache=True, **last_logits_only(model))
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
    ids = torch.tensor([prompt_ids(im, prompt_text(messages, im))], device=next(im.model.parameters()).device)
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
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
