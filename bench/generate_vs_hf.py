"""lorakit generate vs transformers' generate (+ PEFT for an adapter): the demo's evaluation, side by side.

The prompts are the demo's evaluation questions (examples/handbook: held-out, a 30-row
sample of train, unanswerable, general; 218 questions), each with the handbook system prompt,
greedy, 40 new tokens at most, stopping at the end-of-turn token, as `lorakit demo` asks them.

- lorakit: `lorakit.eval.generate.generate` (length-sorted equal batches, the shared system
  prompt prefilled once, finished rows leave the batch, LoRA folded into fp32 weights).
- peer: what a PEFT user writes: the base model (+ `PeftModel.from_pretrained(adapter)`),
  the tokenizer's chat template, left-padded batches in file order, `model.generate`.

Both load the same weights and the same prompt text. The two tools alternate, `--repeats`
times, in one process; the table gives seconds per pass over all prompts, and how many
answers are identical between the two (greedy decoding: they should all be, up to fp32
rounding ties).

    python bench/generate_vs_hf.py --repeats 2                                  # base model
    python bench/generate_vs_hf.py --adapter runs/demo/adapter --repeats 2      # a tuned adapter

Writes bench/results/generate_vs_hf-<base|adapter>.md with the command line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_prompts(limit: int | None) -> tuple[list[str], str]:
    sys.path.insert(0, str(ROOT / "src"))
    from lorakit.config import load_config
    from lorakit.demo import load_demo_data

    cfg = load_config(ROOT / "examples/handbook/lora.yaml", [f"data.train={ROOT / 'examples/handbook/train.jsonl'}"])
    data = load_demo_data(cfg, limit, 30)
    return [p for s in data.sets for p in s.prompts], data.system_prompt


def run_lorakit(prompts, system, adapter, batch_size, max_new):
    from lorakit.eval.generate import GenerationSettings, generate, load_for_inference

    im = load_for_inference("smollm2-135m-instruct", adapter, "fp32")
    im.system_prompt = system
    t = time.perf_counter()
    out = generate(im, prompts, GenerationSettings(max_new_tokens=max_new), batch_size=batch_size)
    return time.perf_counter() - t, out


def run_peer(prompts, system, adapter, batch_size, max_new):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.models import resolve_model
    from lorakit.models.load import model_directory

    path = model_directory(resolve_model("smollm2-135m-instruct"))
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    texts = []
    for p in prompts:
        messages = [{"role": "system", "content": system}] + (
            [{"role": "user", "content": p}] if isinstance(p, str) else list(p))
        texts.append(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    out = []
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=max_new, do_sample=False, temperature=None, top_p=None,
                                 top_k=None, eos_token_id=[eot, tok.eos_token_id], pad_token_id=tok.pad_token_id)
            out += [tok.decode(r, skip_special_tokens=True).strip() for r in gen[:, enc["input_ids"].shape[1]:]]
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", default=None, help="a lorakit (PEFT-format) adapter directory; default: base model")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64, help="lorakit's batch size (the demo's)")
    ap.add_argument("--peer-batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--limit", type=int, default=None, help="rows per eval set (default: all)")
    args = ap.parse_args()
    import torch

    torch.manual_seed(0)
    prompts, system = load_prompts(args.limit)
    rows, outs = [], {}
    for r in range(args.repeats):
        for name, fn, bs in (("lorakit", run_lorakit, args.batch_size), ("peer", run_peer, args.peer_batch_size)):
            seconds, out = fn(prompts, system, args.adapter, bs, args.max_new_tokens)
            outs[name] = out
            rows.append((name, r, seconds))
            print(f"{name} repeat {r}: {seconds:.1f} s for {len(prompts)} prompts", flush=True)
    same = sum(a == b for a, b in zip(outs["lorakit"], outs["peer"]))
    med = {n: statistics.median(s for m, _, s in rows if m == n) for n in ("lorakit", "peer")}
    label = "adapter" if args.adapter else "base"
    lines = [
        f"# lorakit generate vs transformers generate{' + PEFT' if args.adapter else ''} ({label})", "",
        f"Command: `python {' '.join(sys.argv)}`", "",
        f"{len(prompts)} demo eval prompts, greedy, <= {args.max_new_tokens} new tokens, fp32, "
        f"{torch.get_num_threads()} threads; lorakit batch {args.batch_size}, peer batch {args.peer_batch_size}.", "",
        "| tool | repeat | seconds |", "|---|---:|---:|",
        *[f"| {n} | {r} | {s:.1f} |" for n, r, s in rows], "",
        f"Median: lorakit {med['lorakit']:.1f} s, peer {med['peer']:.1f} s: **{med['peer'] / med['lorakit']:.2f}x**. "
        f"Identical answers: {same}/{len(prompts)}.",
    ]
    diffs = [(p, a, b) for p, a, b in zip(prompts, outs["lorakit"], outs["peer"]) if a != b][:5]
    if diffs:
        lines += ["", "Answers that differ (first 5):", ""]
        lines += [f"- {p if isinstance(p, str) else p[-1]['content']!r}: lorakit {a!r} / peer {b!r}" for p, a, b in diffs]
    out = ROOT / "bench" / "results" / f"generate_vs_hf-{label}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
