"""The KL anchor to the base model (train.kl_to_base): exact at weight 0, zero at step 0, the right gradient."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lorakit.config import load_config
from lorakit.errors import LorakitError
from lorakit.train.kl_anchor import KLAnchor, anchor_positions
from lorakit.train.loop import train, train_step
from tests.conftest import save_tiny_model_dir, tiny_model

WORDS = ["red", "green", "blue", "cyan", "black", "white", "amber", "olive", "coral", "ivory", "teal", "plum"]
SYSTEM = "you answer colour questions about the colour wheel and you keep every answer short and plain"


def write_data(path: Path, n: int = 48) -> Path:
    """Chat rows; every other one a replay row (kind: replay)."""
    rows = []
    for i in range(n):
        a, b = WORDS[i % len(WORDS)], WORDS[(i * 5 + 3) % len(WORDS)]
        rows.append({"messages": [{"role": "user", "content": f"what follows {a} here?"},
                                  {"role": "assistant", "content": f"after {a} comes {b} and {a}."}],
                     **({"kind": "replay"} if i % 2 else {"kind": "fact"})})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kl")
    save_tiny_model_dir(root / "model")
    write_data(root / "train.jsonl")
    return root


def run(root: Path, name: str, *overrides: str):
    cfg = load_config(None, [
        f"model.name={root / 'model'}", "model.dtype=fp32", f"data.train={root / 'train.jsonl'}",
        "data.max_length=256", "data.eval_ratio=0.25", f"data.system_prompt={SYSTEM}", "adapter.r=4",
        "adapter.alpha=8", "adapter.dropout=0", "train.max_steps=6", "train.batch_size=2", "train.lr=2e-2",
        "train.precision=fp32", "train.log_every=1", "train.warmup_steps=0", f"output_dir={root / name}", "seed=3",
        *overrides,
    ])
    return train(cfg, quiet=True)


def train_events(run_dir: Path) -> list[dict]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "train"]


def test_weight_zero_gives_todays_losses_exactly(workspace: Path) -> None:
    plain = run(workspace, "plain")
    zero = run(workspace, "zero", "train.kl_to_base.weight=0", "train.kl_to_base.on=all")
    assert zero.losses == plain.losses
    assert "kl" not in train_events(workspace / "zero")[0]


@pytest.mark.parametrize("on", ["replay", "non_target", "all"])
def test_kl_is_zero_at_step_0_and_logged(workspace: Path, on: str) -> None:
    run(workspace, f"kl-{on}", "train.kl_to_base.weight=1.0", f"train.kl_to_base.on={on}")
    kls = [e["kl"] for e in train_events(workspace / f"kl-{on}")]
    assert len(kls) == 6
    assert abs(kls[0]) < 1e-6  # B = 0: the tuned model is the base model
    assert max(kls[1:]) > 1e-6  # and it moves away as it trains
    assert all(k >= -1e-6 for k in kls)
    assert "KL to the base model" in (workspace / f"kl-{on}" / "report.html").read_text()


def test_the_anchor_pulls_toward_the_base(workspace: Path) -> None:
    free = run(workspace, "free-all", "train.kl_to_base.weight=1e-9", "train.kl_to_base.on=all")
    held = run(workspace, "held-all", "train.kl_to_base.weight=5.0", "train.kl_to_base.on=all")
    assert free.losses[0] == pytest.approx(held.losses[0], rel=1e-6)  # the same first batch and model
    free_kl = [e["kl"] for e in train_events(workspace / "free-all")]
    held_kl = [e["kl"] for e in train_events(workspace / "held-all")]
    assert held_kl[-1] < free_kl[-1]


def test_frozen_block_replay_gives_the_same_run(workspace: Path) -> None:
    """Adapters on the upper block only: both passes start from the replayed frozen block 0."""
    common = ("train.kl_to_base.weight=1.0", "train.kl_to_base.on=all", "train.max_steps=0", "train.epochs=3",
              "adapter.target_modules=model\\.layers\\.1\\..*_proj")
    cached = run(workspace, "frozen-on", *common)
    plain = run(workspace, "frozen-off", *common, "train.cache_frozen=false")
    assert cached.frozen_replays > 0 and plain.frozen_replays == 0
    assert cached.losses == pytest.approx(plain.losses, rel=1e-5)
    a = [e["kl"] for e in train_events(workspace / "frozen-on")]
    b = [e["kl"] for e in train_events(workspace / "frozen-off")]
    assert a == pytest.approx(b, rel=1e-4, abs=1e-7)


def test_qlora_base(workspace: Path) -> None:
    run(workspace, "qlora-kl", "adapter.method=qlora", "quantization.compute_dtype=fp32",
        "train.kl_to_base.weight=1.0", "train.kl_to_base.on=non_target")
    kls = [e["kl"] for e in train_events(workspace / "qlora-kl")]
    assert abs(kls[0]) < 1e-6 and max(kls) > 1e-6


def test_replay_positions_without_replay_rows_is_an_error(workspace: Path, tmp_path: Path) -> None:
    data = tmp_path / "plain.jsonl"
    data.write_text("".join(line.replace('"kind": "replay"', '"kind": "fact"') + "\n"
                            for line in (workspace / "train.jsonl").read_text().splitlines()))
    with pytest.raises(LorakitError, match="kind: replay"):
        run(workspace, "no-replay", f"data.train={data}", "train.kl_to_base.weight=1.0")
    with pytest.raises(LorakitError, match="full fine-tuning"):
        run(workspace, "full-kl", "adapter.method=full", "train.kl_to_base.weight=1.0", "train.kl_to_base.on=all")


def test_config_rejects_negative_weight() -> None:
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match="kl_to_base.weight"):
        load_config(None, ["train.kl_to_base.weight=-1"])
    with pytest.raises(ConfigError, match="kl_to_base.on"):
        load_config(None, ["train.kl_to_base.on=prompts"])
    with pytest.raises(ConfigError, match="kl_to_base.on"):
        load_config(None, ["train.kl_to_base.on=[]"])
    assert load_config(None, ["train.kl_to_base.on=[replay, non_target]"]).train.kl_to_base.on == ["replay", "non_target"]


class _Recorder:
    """An optimizer stand-in that keeps the gradients train_step hands it."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.param_groups = [{"params": params}]
        self.grads: list[torch.Tensor] = []

    def step(self) -> None:
        self.grads = [p.grad.detach().clone() for p in self.param_groups[0]["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.param_groups[0]["params"]:
            p.grad = None


@pytest.mark.parametrize("on", ["replay", "non_target", "all", ["replay", "non_target"]])
def test_gradient_matches_a_plain_reference(on: str) -> None:
    """mean CE + w * mean KL(base || tuned), written out with full logits and a separate base model."""
    from lorakit.adapters import inject_lora, lora_parameters

    torch.manual_seed(0)
    model, base = tiny_model("llama"), tiny_model("llama")
    inject_lora(model, ["all-linear"], r=4, alpha=8)
    for p in lora_parameters(model):
        torch.nn.init.normal_(p, std=0.05)
    gen = torch.Generator().manual_seed(1)
    micro = []
    for _ in range(2):  # two micro-batches: the KL is averaged over the whole step's positions
        ids = torch.randint(0, 128, (2, 12), generator=gen)
        labels = ids.clone()
        labels[:, :4] = -100
        labels[1, :9] = -100
        real = torch.ones_like(ids, dtype=torch.bool)
        real[1, 10:] = False  # padding at the end of row 1
        labels[1, 10:] = -100
        replay = torch.zeros_like(real)
        replay[0] = True
        micro.append({"input_ids": ids, "labels": labels, "real_mask": real, "replay_mask": replay})
    weight = 0.7

    ce_sum, n, kl_sum, m = 0.0, 0, 0.0, 0
    for b in micro:
        logits = model(input_ids=b["input_ids"]).logits[:, :-1]  # (B, T-1, V)
        with torch.no_grad():
            base_logits = base(input_ids=b["input_ids"]).logits[:, :-1]
        targets = b["labels"][:, 1:]
        ce_sum = ce_sum + F.cross_entropy(logits.reshape(-1, 128), targets.reshape(-1), ignore_index=-100,
                                          reduction="sum")
        n += int((targets != -100).sum())
        pos = anchor_positions(b, on)
        p_log = F.log_softmax(base_logits[pos], -1)
        kl_sum = kl_sum + (p_log.exp() * (p_log - F.log_softmax(logits[pos], -1))).sum()
        m += int(pos.sum())
    assert m > 0
    reference = ce_sum / n + weight * kl_sum / m
    reference.backward()
    want = [p.grad.clone() for p in lora_parameters(model)]
    for p in lora_parameters(model):
        p.grad = None

    anchor = KLAnchor(weight, on)
    opt = _Recorder(lora_parameters(model))
    loss, _, kl = train_step(model, anchor, micro, opt, 0.0, contextlib.nullcontext, 1, anchor)
    assert loss == pytest.approx(float(ce_sum.detach()) / n, rel=1e-5)
    assert kl == pytest.approx(float(kl_sum.detach()) / m, rel=1e-4)
    for got, ref in zip(opt.grads, want):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
