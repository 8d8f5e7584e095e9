"""`lorakit demo`: the main job.

Until the SmolLM2 domain-tuning demo lands, this trains LoRA adapters on a tiny random
Llama to memorise a fixed token sequence, then saves the adapter in PEFT's format,
reloads it into a fresh copy of the base and checks the logits agree. Everything it
prints is measured.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lorakit.adapters import inject_lora, load_adapter, parameter_summary, save_adapter


def _tiny_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def run_demo(output_dir: Path, steps: int = 60) -> dict[str, float]:
    from rich.console import Console

    console = Console()
    torch.manual_seed(0)
    model = _tiny_llama()
    names = inject_lora(model, ["all-linear"], r=8, alpha=16)
    console.print(f"[bold]lorakit demo[/bold]: LoRA r=8 on {len(names)} layers of a tiny random Llama")
    console.print(parameter_summary(model))
    tokens = torch.randint(0, 256, (4, 32))  # the sequences to memorise

    def loss_fn() -> torch.Tensor:
        logits = model(input_ids=tokens).logits[:, :-1]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    start = time.perf_counter()
    with torch.no_grad():
        first = loss_fn().item()
    for step in range(1, steps + 1):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            console.print(f"step {step:3d}  loss {loss.item():.4f}")
    model.eval()
    with torch.no_grad():
        last = loss_fn().item()
        logits = model(input_ids=tokens).logits
    elapsed = time.perf_counter() - start
    adapter_dir = save_adapter(model, output_dir / "adapter", base_model_name_or_path="tiny-random-llama")
    fresh = _tiny_llama()
    load_adapter(fresh, adapter_dir)
    with torch.no_grad():
        diff = (fresh(input_ids=tokens).logits - logits).abs().max().item()
    console.print(f"loss {first:.4f} -> {last:.4f} in {steps} steps ({elapsed:.1f} s)")
    console.print(f"adapter saved to {adapter_dir}; reloaded into a fresh base: max |logit diff| = {diff:.2e}")
    return {"loss_before": first, "loss_after": last, "reload_max_diff": diff}
