"""The demo's model in llama.cpp: what each GGUF type costs, measured with llama.cpp itself.

The demo's tuned adapter (runs/demo/adapter, `make demo`) is merged in fp32 and exported as
f16, q8_0 and q4_k_m (and the base model alone as f16; and the adapter alone as a LoRA GGUF on
that base). Each file answers the demo's 218 evaluation questions (held-out, a 30-row train
sample, unanswerable, general; the handbook system prompt; greedy, 40 new tokens at most) in
llama.cpp's llama-simple-lora (llama-simple + a LoRA GGUF; --threads, default 1; one process per question,
so the load is timed each time).
Against lorakit's own greedy answers from the fp32 model (`lorakit generate`'s decoder) the table
gives the share of identical answers, and the held-out fact accuracy by lorakit's metric.

    scripts/build_llamacpp.sh                      # once: llama.cpp's programs in the cache
    python bench/gguf_llamacpp.py                  # all rows (~218 llama.cpp runs per row)
    python bench/gguf_llamacpp.py --limit 40 --rows tuned-f16,tuned-q8_0

Writes bench/results/gguf_llamacpp.md (+ .json with every answer); files go to --work.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
ROWS = ("base-f16", "tuned-f16", "tuned-q8_0", "tuned-q4_k_m", "tuned-lora")


def demo_sets(limit: int | None):
    from lorakit.config import load_config
    from lorakit.demo import load_demo_data

    cfg = load_config(ROOT / "examples/handbook/lora.yaml", [f"data.train={ROOT / 'examples/handbook/train.jsonl'}"])
    return load_demo_data(cfg, limit, 30)


def lorakit_answers(adapter: Path | None, prompts, system: str) -> tuple[list[str], float]:
    from lorakit.eval.generate import GenerationSettings, generate, load_for_inference

    im = load_for_inference("smollm2-135m-instruct", adapter, "fp32")
    im.system_prompt = system
    start = time.perf_counter()
    out = generate(im, prompts, GenerationSettings(max_new_tokens=40), batch_size=64)
    return out, time.perf_counter() - start


def export(row: str, adapter: Path, work: Path, reuse: bool = False) -> dict:
    from lorakit.export.gguf import export_gguf

    kind = row.split("-", 1)[1]
    if reuse and (work / f"{row}.gguf").exists():  # a file exported before (times not measured then)
        return {"bytes": (work / f"{row}.gguf").stat().st_size, "export_s": None, "quantize_s": None}
    start = time.perf_counter()
    if row == "tuned-lora":
        result = export_gguf(None, work / "tuned-lora.gguf", adapter, "f16", verify="none", force=True, adapter_only=True)
    else:
        result = export_gguf("smollm2-135m-instruct" if row.startswith("base") else None, work / f"{row}.gguf",
                             None if row.startswith("base") else adapter, kind, verify="none", force=True,
                             modelfile=False)
    return {"bytes": result.bytes, "export_s": time.perf_counter() - start,
            "quantize_s": getattr(result, "quantize_s", None)}


def run_row(row: str, work: Path, texts: list[str], reference: list[str], threads: int) -> dict:
    from lorakit.export import llamacpp

    model = work / ("base-f16.gguf" if row == "tuned-lora" else f"{row}.gguf")
    lora = work / "tuned-lora.gguf" if row == "tuned-lora" else None
    answers, loads, speeds, walls = [], [], [], []
    for i, text in enumerate(texts):
        c = llamacpp.simple(model, text, 40, lora=lora, threads=threads)
        answers.append(c.text.strip())
        walls.append(c.wall_s)
        if c.load_ms is not None:
            loads.append(c.load_ms)
        if c.tokens_per_s is not None and c.tokens and c.tokens > 4:
            speeds.append(c.tokens_per_s)
        if (i + 1) % 20 == 0:
            print(f"  {row}: {i + 1}/{len(texts)}", file=sys.stderr, flush=True)
    same = sum(a == r for a, r in zip(answers, reference))
    return {"answers": answers, "same": same, "asked": len(texts),
            "load_ms_median": statistics.median(loads) if loads else None,
            "tokens_per_s_median": statistics.median(speeds) if speeds else None,
            "wall_s_total": sum(walls)}


def heldout_fact(answers: list[str], targets) -> float:
    from lorakit.eval.metrics import fact_match

    scored = [fact_match(a, t.fact) for a, t in zip(answers, targets) if t.fact]
    return sum(scored) / len(scored)


def table(results: dict, n_heldout: int) -> str:
    lines = ["| file | size | export (quantize) | llama.cpp load | llama.cpp tokens/s | answers identical to lorakit's "
             "| held-out fact accuracy (lorakit's answers) |", "|---|---|---|---|---|---|---|"]
    for row, r in results["rows"].items():
        if "same" not in r:
            continue
        q = f" ({r['quantize_s']:.1f} s llama-quantize)" if r.get("quantize_s") else ""
        size = f"{r['bytes'] / 2**20:.1f} MiB"
        made = f"{r['export_s']:.0f} s{q}" if r.get("export_s") else "(reused)"
        lines.append(f"| {row} | {size} | {made} | {r['load_ms_median']:.0f} ms | "
                     f"{r['tokens_per_s_median']:.1f} | {r['same']}/{r['asked']} ({100 * r['same'] / r['asked']:.1f}%) | "
                     f"{100 * r['heldout_fact']:.1f}% ({100 * r['reference_heldout_fact']:.1f}%) |")
    return "\n".join(lines) + f"\n\n(held-out questions: {n_heldout})\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", type=Path, default=ROOT / "runs/demo/adapter")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--limit", type=int, default=None, help="questions per eval set (default: all 218)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lorakit-gguf-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/gguf_llamacpp.md")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads (1: on a busy 2-core box, 2 threads "
                    "spin-waited 8.3 s per question against 0.65 s for 1)")
    ap.add_argument("--reuse", action="store_true", help="use a row's file already in --work instead of exporting it")
    args = ap.parse_args()
    from lorakit.eval.generate import InferenceModel, prompt_text
    from lorakit.models.load import load_tokenizer

    rows = args.rows.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    data = demo_sets(args.limit)
    prompts = [p for s in data.sets for p in s.prompts]
    heldout = data.sets[0]
    im = InferenceModel(None, load_tokenizer("smollm2-135m-instruct"), "auto", data.system_prompt)
    texts = [prompt_text(p, im) for p in prompts]
    cache = args.out.with_suffix(".json")
    results = json.loads(cache.read_text()) if cache.exists() else {"rows": {}, "reference": {}}
    results.update(command=" ".join(["python", "bench/gguf_llamacpp.py", *sys.argv[1:]]),
                   machine=f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores")
    for which in ("base", "tuned"):
        if any(r.startswith(which) for r in rows) and len(results["reference"].get(which, {}).get("answers", [])) != len(prompts):
            answers, seconds = lorakit_answers(None if which == "base" else args.adapter, prompts, data.system_prompt)
            results["reference"][which] = {"answers": answers, "seconds": seconds,
                                           "heldout_fact": heldout_fact(answers[: len(heldout)], heldout.targets)}
            print(f"lorakit {which}: {seconds:.0f} s for {len(prompts)} answers", file=sys.stderr)
            cache.write_text(json.dumps(results, indent=1))
    for row in rows:
        print(f"{row}: exporting", file=sys.stderr, flush=True)
        r = export(row, args.adapter, args.work, args.reuse)
        if row == "tuned-lora" and not (args.work / "base-f16.gguf").exists():
            export("base-f16", args.adapter, args.work)  # the base the adapter is applied to
        ref = results["reference"]["base" if row.startswith("base") else "tuned"]
        r.update(run_row(row, args.work, texts, ref["answers"], args.threads))
        r["heldout_fact"] = heldout_fact(r["answers"][: len(heldout)], heldout.targets)
        r["reference_heldout_fact"] = ref["heldout_fact"]
        results["rows"][row] = r
        cache.write_text(json.dumps(results, indent=1))
        print(table(results, len(heldout)), file=sys.stderr)
    head = (f"# GGUF in llama.cpp: the demo's model per type\n\n`{results['command']}` on {results['machine']}\n\n")
    args.out.write_text(head + table(results, len(heldout)))


if __name__ == "__main__":
    main()
