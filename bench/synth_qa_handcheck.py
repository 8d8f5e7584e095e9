"""The hand check of `lorakit synth qa`'s answer-first output (bench/results/synth_qa-smollm2-handbook.md, run C).

    python bench/synth_qa_handcheck.py OUT [--seed 0] [--n 30]

Prints a seeded random sample of the kept rows (train, heldout, unanswerable, in file order) to read against
the documents, and for each sampled fact row whether `synth.round_trip exclusive` would have kept it, from the
round-trip answer already in OUT/teacher_cache (no teacher call; the SmolLM2 teacher's identity as `synth qa`
records it with default settings).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lorakit.synth.answer_first import Item, answer_prompt, other_spans, round_trip
from lorakit.synth.spans import answer_spans
from lorakit.synth.teacher import Limits, TeacherCache

IDENTITY = {"kind": "local", "model": "smollm2-135m-instruct", "adapter": None, "template": "auto", "system": None,
            "dtype": "torch.float32", "max_new_tokens": 512, "temperature": 0.0, "seed": 0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--answer-tokens", type=int, default=24)
    args = ap.parse_args()
    cache = TeacherCache(args.out / "teacher_cache", IDENTITY)
    rows = [json.loads(line) | {"file": name} for name in ("train", "heldout", "unanswerable")
            for line in (args.out / f"{name}.jsonl").read_text().splitlines()]
    pick = sorted(random.Random(args.seed).sample(range(len(rows)), min(args.n, len(rows))))
    for i in pick:
        r = rows[i]
        q, a, fact = r["messages"][0]["content"], r["messages"][1]["content"], r["fact"]
        verdict = ""
        if r["kind"] == "fact":
            span = next(s for s in answer_spans(a) if s.text == fact)
            reply = cache.get(cache.key(answer_prompt(a, q), Limits(args.answer_tokens)))
            if reply is not None:
                keep = round_trip(reply.text, span, other_spans(Item(0, a, span, q), 4))
                verdict = f"  round trip: {reply.text!r} -> exclusive {'keeps' if keep else 'drops'}"
        print(f"[{i}] {r['file']} {r['kind']} {r.get('variant', '')}\n  Q: {q}\n  A: {a}\n  fact: {fact}{verdict}")


if __name__ == "__main__":
    main()
