"""A classification.method head run: load the sequence classifier, adapt it, train, save (adapter/ or model/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorakit.classify.data import TaskSpec
from lorakit.config import Config, dump_config
from lorakit.io import atomic_dir, atomic_write_text


def train_head_classifier(cfg: Config, spec: TaskSpec, rows: list, console: Any) -> Path:
    """Returns the directory holding the weights: run_dir/adapter (LoRA, SEQ_CLS) or run_dir/model (full)."""
    from lorakit.adapters.inject import parameter_summary
    from lorakit.classify.head import add_lora, load_sequence_classifier, save_head_adapter
    from lorakit.classify.head_train import train_head
    from lorakit.models.load import load_tokenizer, model_directory, resolve_dtype
    from lorakit.models.resolve import resolve_model
    from lorakit.train.loop import seed_everything
    from lorakit.train.support import autocast_dtype, resolve_device

    run_dir = Path(cfg.output_dir)  # new or empty: train_classifier checked
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.seed)  # the fresh head's initialisation
    tokenizer = load_tokenizer(cfg.model.name, cfg.model.trust_remote_code, cfg.model.revision)
    where = model_directory(resolve_model(cfg.model.name), cfg.model.revision)
    model = load_sequence_classifier(where, spec.labels, resolve_dtype(cfg.model.dtype), tokenizer.pad_token_id,
                                     cfg.model.trust_remote_code).to(device)
    if cfg.adapter.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        add_lora(model, cfg.adapter)
    console.print(f"model {cfg.model.name} + {len(spec.labels)}-way head: {parameter_summary(model)}")
    y = [spec.labels.index(r.label) for r in rows]
    result = train_head(model, tokenizer, [r.text for r in rows], y, cfg.train, spec.max_length, cfg.seed, run_dir,
                        autocast_dtype(cfg.train.precision, device))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    atomic_write_text(run_dir / "eval.json", json.dumps({
        "step": result.steps, "train_loss_last": result.final_loss, "elapsed_s": round(result.elapsed, 2),
        "peak_rss_mb": result.peak_rss_mb, "trainable_params": trainable}, indent=2) + "\n")
    console.print(f"trained {result.steps} steps in {result.elapsed:.1f} s, last loss {result.final_loss:.4f}")
    if cfg.adapter.method == "full":
        with atomic_dir(run_dir / "model", overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        return run_dir / "model"
    return save_head_adapter(model, run_dir / "adapter", cfg.model.name, {"base_model": cfg.model.name,
                                                                          "method": cfg.adapter.method})
