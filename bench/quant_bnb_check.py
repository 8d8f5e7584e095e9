"""Cross-check of `lorakit quantize report`'s perplexities with bitsandbytes doing the quantization.

The report's 4-bit rows are lorakit's own quantization, loaded layer by layer, with bf16
compute. Here the fp32 model's linear weights (all but the output head) are replaced by
bitsandbytes' `quantize_4bit` + `dequantize_4bit` of themselves, and perplexity is computed
in fp32 on the same windows (the first --max-windows windows of --max-length tokens), so a
bug in lorakit's loader or layers would show as a gap between the two.

    OMP_NUM_THREADS=1 python bench/quant_bnb_check.py --text bench/results/emma_ch1-3.txt --max-windows 6
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def perplexity(model: torch.nn.Module, windows: list[list[int]]) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            nll += float(F.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            n += len(w) - 1
    return math.exp(nll / n)


def main() -> None:
    import bitsandbytes.functional as bnbf

    from lorakit.experiments.quant_measure import linear_layers
    from lorakit.experiments.quant_report import text_windows
    from lorakit.models.load import load_model, load_tokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--text", required=True)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=6)
    parser.add_argument("--settings", default="nf4-dq/64,fp4/64")
    args = parser.parse_args()
    tok = load_tokenizer(args.model)
    ids = tok(Path(args.text).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    windows = text_windows(ids, args.max_length, args.max_windows)
    model = load_model(args.model, "fp32", with_tokenizer=False).model
    layers = linear_layers(model)
    original = {name: m.weight.detach().clone() for name, m in layers.items()}
    results = {"fp32": perplexity(model, windows)}
    for setting in args.settings.split(","):
        method, _, size = setting.partition("/")
        quant_type, _, dq = method.partition("-")
        start = time.perf_counter()
        for name, m in layers.items():
            packed, state = bnbf.quantize_4bit(original[name], blocksize=int(size), quant_type=quant_type,
                                               compress_statistics=dq == "dq")
            m.weight.data.copy_(bnbf.dequantize_4bit(packed, state).reshape(original[name].shape))
        results[f"bitsandbytes {setting}, fp32 compute"] = perplexity(model, windows)
        print(setting, f"{time.perf_counter() - start:.0f} s", flush=True)
    print(json.dumps({"windows": len(windows), "max_length": args.max_length, "perplexity": results}, indent=1))


if __name__ == "__main__":
    main()
