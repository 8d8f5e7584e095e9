"""Keep the general-knowledge candidates that the base model already answers correctly.

    .venv/bin/python examples/handbook/select_general.py CANDIDATES.jsonl OUT.jsonl

general.jsonl measures whether LoRA tuning on the handbook damages what the model knew
before, so it must only hold questions the *base* model gets right. Each candidate is
asked to the builtin SmolLM2-135M-Instruct (fp32, CPU, greedy, 48 new tokens) under the
demo's system prompt, and kept iff its fact matches the answer: normalise both (lowercase,
string.punctuation and curly quotes removed, the words a/an/the removed, whitespace
collapsed) and require the fact to appear in the answer as whole words (a substring that
also sits on word boundaries, so "4" does not match "14"). Prints every candidate's result
and how many passed; writes the kept rows unchanged, in their original order.

REVIEWED_OUT lists candidates whose answer contained the fact by accident while being
wrong (found by reading the PASS lines); they are dropped even though they match.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lorakit.eval.metrics import fact_match

HERE = Path(__file__).resolve().parent
MODEL = "smollm2-135m-instruct"
REVIEWED_OUT = {
    "What is frozen water called?",  # "Frozen water is a type of liquid ... the melting of ice"
    "What is a baby dog called?",  # "A baby dog is ... typically smaller than a puppy"
}


def fact_matches(answer: str, fact: str) -> bool:
    """The demo's fact metric (lorakit.eval.metrics.fact_match)."""
    return fact_match(answer, fact) == 1.0


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    src, dst = Path(argv[0]), Path(argv[1])
    rows = [json.loads(line) for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    system_prompt = (HERE / "system_prompt.txt").read_text(encoding="utf-8").strip()
    questions = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in rows]

    from lorakit.eval.generate import GenerationSettings, generate, load_for_inference

    start = time.perf_counter()
    im = load_for_inference(MODEL, None, "fp32")
    answers = generate(im, questions, GenerationSettings(max_new_tokens=48), batch_size=16,
                       system_prompt=system_prompt)
    kept = []
    for row, question, answer in zip(rows, questions, answers):
        ok = fact_matches(answer, row["fact"])
        verdict = "PASS" if ok else "FAIL"
        if ok and question in REVIEWED_OUT:
            ok, verdict = False, "OUT "  # matched, but the answer is wrong (read by hand)
        print(f"{verdict}  {question}  [{row['fact']}]  -> {answer!r}")
        if ok:
            kept.append(row)
    dst.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    print(f"{len(kept)}/{len(rows)} candidates passed ({MODEL}, greedy, "
          f"{time.perf_counter() - start:.0f} s); wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
