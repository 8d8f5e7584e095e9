"""Prompt tuning (Lester et al. 2021): trained virtual-token embeddings in front of every sequence.

The base model is frozen whole; `num_virtual_tokens` rows of embeddings (n, H) are the only
trained parameters. PEFT prepends them to `inputs_embeds` inside its forward; lorakit puts them
in the token sequence itself: virtual token k is the id `-1 - k`, and the model's input
embedding is wrapped (`PromptTunedEmbedding`) so those ids read the trained rows. Everything
downstream of the embedding (position ids, attention masks, packing with its block mask, the
KV cache of generation) then handles the virtual tokens as it handles any token, and each
caller prepends them with `virtual_token_ids` (data.virtual for training data, eval.generate
for prompts). With the virtual tokens at positions 0..n-1 and the text after them, a sequence
computes exactly what PeftModel.forward computes (it prepends inputs_embeds, positions start
at 0 on the virtual tokens).

Initialisation follows PEFT's PromptEmbedding: RANDOM is nn.Embedding's default, N(0, 1);
TEXT embeds `tokenizer(text)["input_ids"]` (special tokens included, as PEFT calls it), the ids
repeated then cut to n. Files are PEFT's PROMPT_TUNING format (adapters.state writes them):
adapter_config.json (`peft_prompt_config`) and one tensor `prompt_embeddings` (n, H) in fp32.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lorakit.errors import LorakitError

PROMPT_KEY = "prompt_embeddings"  # PEFT's key in adapter_model.safetensors: (num_virtual_tokens, token_dim)
PEFT_TYPE = "PROMPT_TUNING"


def virtual_token_ids(n: int) -> list[int]:
    """The ids of virtual tokens 0..n-1 (-1, -2, ...): no real token has a negative id."""
    return [-1 - k for k in range(n)]


class PromptTunedEmbedding(nn.Module):
    """The model's input embedding plus `n` virtual tokens: id -1-k reads row k of prompt_embeddings.

    prompt_embeddings is fp32 (PEFT keeps it so) and cast to the embedding's output dtype, as
    PEFT casts it to inputs_embeds' dtype. Ids >= 0 go to the wrapped embedding unchanged.
    """

    def __init__(self, embedding: nn.Module, prompt: torch.Tensor, init_text: str | None = None) -> None:
        super().__init__()
        self.embedding = embedding
        self.prompt_embeddings = nn.Parameter(prompt.detach().float().clone())  # (n, H)
        self.init_text = init_text  # PEFT's prompt_tuning_init_text (None: RANDOM), written back on save

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    @property
    def num_embeddings(self) -> int:
        return self.embedding.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.embedding.embedding_dim

    @property
    def padding_idx(self) -> int | None:
        return getattr(self.embedding, "padding_idx", None)

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.prompt_embeddings.shape[0])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        lowest = int(input_ids.min()) if input_ids.numel() else 0  # one device sync per call
        if lowest >= 0:  # no virtual token (a decode step)
            return self.embedding(input_ids)
        if lowest < -self.num_virtual_tokens:
            raise LorakitError(f"a sequence holds virtual token id {lowest}, but the prompt-tuning adapter has "
                               f"{self.num_virtual_tokens} virtual tokens (ids -1..-{self.num_virtual_tokens})")
        virtual = input_ids < 0  # (B, T)
        embeds = self.embedding(input_ids.clamp(min=0))  # (B, T, H)
        rows = self.prompt_embeddings[(-1 - input_ids).clamp(min=0)]  # (B, T, H)
        return torch.where(virtual[..., None], rows.to(embeds.dtype), embeds)


def prompt_embedding(model: nn.Module) -> PromptTunedEmbedding | None:
    """The model's prompt-tuned input embedding, or None when it has none."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return emb if isinstance(emb, PromptTunedEmbedding) else None


def model_virtual_ids(model: nn.Module) -> list[int]:
    """The virtual-token ids every sequence given to `model` starts with ([] without prompt tuning)."""
    layer = prompt_embedding(model)
    return virtual_token_ids(layer.num_virtual_tokens) if layer is not None else []


def random_init(n: int, dim: int) -> torch.Tensor:
    """PEFT's RANDOM: nn.Embedding(n, dim)'s own init, N(0, 1) from the global generator (seeded by the run)."""
    return torch.empty(n, dim).normal_()


def text_init(embedding: nn.Module, tokenizer: Any, text: str, n: int) -> torch.Tensor:
    """PEFT's TEXT: the embeddings of `text`'s token ids, repeated then cut to n rows, in fp32."""
    ids = list(tokenizer(text)["input_ids"])  # PEFT's call: special tokens the tokenizer adds included
    if not ids:
        raise LorakitError(f"adapter.prompt_tuning_init_text {text!r} tokenizes to no tokens; give a non-empty text")
    ids = (ids * math.ceil(n / len(ids)))[:n]
    device = embedding.weight.device
    with torch.no_grad():
        return embedding(torch.tensor(ids, dtype=torch.long, device=device)).detach().float().cpu()


def inject_prompt_tuning(model: nn.Module, num_virtual_tokens: int, init_text: str | None = None,
                         tokenizer: Any = None, prompt: torch.Tensor | None = None) -> PromptTunedEmbedding:
    """Wrap the model's input embedding with `num_virtual_tokens` trained rows and freeze everything else.

    The rows: `prompt` when given (a loaded adapter), else TEXT init from `init_text` (needs the
    tokenizer), else RANDOM init.
    """
    if prompt_embedding(model) is not None:
        raise LorakitError("the model already has prompt-tuning virtual tokens; load one prompt-tuning adapter at a time")
    if not hasattr(model, "get_input_embeddings") or model.get_input_embeddings() is None:
        raise LorakitError(f"{type(model).__name__} has no input embedding to prepend virtual tokens to")
    embedding = model.get_input_embeddings()
    dim = int(embedding.weight.shape[1])
    if prompt is None:
        if init_text is not None:
            if tokenizer is None:
                raise LorakitError("prompt tuning's text init needs the model's tokenizer")
            prompt = text_init(embedding, tokenizer, init_text, num_virtual_tokens)
        else:
            prompt = random_init(num_virtual_tokens, dim)
    for p in model.parameters():
        p.requires_grad_(False)
    layer = PromptTunedEmbedding(embedding, prompt.to(embedding.weight.device), init_text)
    model.set_input_embeddings(layer)
    return layer


def _model_dims(model: nn.Module) -> tuple[int, int]:
    """(num_layers, num_attention_heads) as PEFT's _prepare_prompt_learning_config reads them."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if layers is None or heads is None:
        raise LorakitError(f"{type(model).__name__}'s config names no num_hidden_layers / num_attention_heads, "
                           "which PEFT's PROMPT_TUNING config records")
    return int(layers), int(heads)


def peft_prompt_config(model: nn.Module, base_model_name_or_path: str | None) -> dict[str, Any]:
    """adapter_config.json as PEFT 0.21's PromptTuningConfig writes it (inference_mode true); a TEXT init
    names the base as its tokenizer_name_or_path, as PEFT asks (loading never re-runs the init)."""
    layer = prompt_embedding(model)
    if layer is None:
        raise LorakitError("the model has no prompt-tuning virtual tokens to save")
    init_text = layer.init_text
    num_layers, heads = _model_dims(model)
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": heads,
        "num_layers": num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": layer.num_virtual_tokens,
        "peft_type": PEFT_TYPE,
        "prompt_tuning_init": "TEXT" if init_text is not None else "RANDOM",
        "prompt_tuning_init_text": init_text,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": layer.embedding_dim,
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": base_model_name_or_path if init_text is not None else None,
    }


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def prompt_config_problem(config: dict[str, Any]) -> str | None:
    """What makes a PROMPT_TUNING adapter_config.json unusable by lorakit, or None."""
    task = config.get("task_type")
    if task not in (None, "CAUSAL_LM"):
        return f"task_type is {task!r}; lorakit loads CAUSAL_LM prompt-tuning adapters"
    if not _positive_int(config.get("num_virtual_tokens")):
        return f"num_virtual_tokens is {config.get('num_virtual_tokens')!r}, expected a positive integer"
    if config.get("num_transformer_submodules", 1) not in (None, 1):
        return (f"num_transformer_submodules is {config['num_transformer_submodules']!r}; a causal LM has 1 "
                "(2 is an encoder-decoder's)")
    if config.get("token_dim") is not None and not _positive_int(config["token_dim"]):
        return f"token_dim is {config['token_dim']!r}, expected a positive integer"
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        return f"base_model_name_or_path is {base!r}, expected a string"
    return None


def check_prompt_weights(weights: dict[str, torch.Tensor], config: dict[str, Any], directory: Any,
                         token_dim: int | None = None) -> torch.Tensor:
    """The (n, H) prompt embeddings of a PROMPT_TUNING adapter, checked against its config (and the model's H)."""
    unknown = sorted(set(weights) - {PROMPT_KEY})
    if unknown:
        raise LorakitError(f"adapter {directory} holds weights a prompt-tuning adapter does not have "
                           f"(e.g. {unknown[0]}); the file is damaged")
    if PROMPT_KEY not in weights:
        raise LorakitError(f"adapter {directory}: peft_type {PEFT_TYPE} but no {PROMPT_KEY} tensor; the file is damaged")
    prompt = weights[PROMPT_KEY]
    n, dim = config["num_virtual_tokens"], config.get("token_dim")
    if prompt.dim() != 2 or prompt.shape[0] != n or (dim is not None and prompt.shape[1] != dim):
        raise LorakitError(f"adapter {directory}: {PROMPT_KEY} has shape {tuple(prompt.shape)}, but "
                           f"adapter_config.json says {n} virtual tokens of {dim}; the adapter is damaged")
    if token_dim is not None and prompt.shape[1] != token_dim:
        base = config.get("base_model_name_or_path") or "unknown"
        raise LorakitError(f"adapter {directory}: its virtual tokens are {prompt.shape[1]} wide but this model's "
                           f"embeddings are {token_dim}; it was trained on base model {base}: load it on that model")
    return prompt
