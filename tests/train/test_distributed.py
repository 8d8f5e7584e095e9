"""DDP and FSDP2 under torchrun on CPU (gloo, 2 processes): the numbers of one process, resumable, failing fast.

Every 2-process job starts through torchrun in a subprocess with a hard timeout. One launch
(the `distributed_runs` fixture) trains all the compared configs in one process group, so
torchrun's start-up is paid once; this file, run as a script, is that launch's driver (and
the wrapper that gives one rank bad data).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from lorakit.quant.linear import QuantizedLinear

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 300  # seconds for any one 2-process job; a hang fails the test instead of blocking CI
STEPS = 6


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=path, COLUMNS="200")


def torchrun(*args: str, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 ARGS` through lorakit's launcher (short failure summary)."""
    runner = "import sys; from lorakit.train.distributed import torchrun_main; torchrun_main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", runner, "--standalone", "--nproc-per-node=2", *args],
                          capture_output=True, text=True, env=_env(), timeout=timeout)


def lorakit(*args: str, timeout: int = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, env=_env(),
                          timeout=timeout)


def write_config(root: Path, name: str, **sections: dict[str, Any]) -> Path:
    """A tiny fp32 LoRA config; each keyword replaces keys of that section."""
    cfg: dict[str, Any] = {
        "model": {"name": str(root / "model"), "dtype": "fp32"},
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["all-linear"]},
        "quantization": {"compute_dtype": "fp32"},
        "data": {"train": str(root / "train.jsonl"), "max_length": 64, "eval_ratio": 0.25, "packing": True},
        # per-rank batch 2 with 2 ranks: global micro-batch 4, global step batch 2 x 2 x 2 = 8 rows
        "train": {"max_steps": STEPS, "batch_size": 2, "grad_accum": 2, "lr": 1e-3, "log_every": 1, "eval_every": 0,
                  "save_every": 0, "precision": "fp32", "warmup_steps": 0},
        "distributed": {"strategy": "ddp", "timeout_s": 120},
        "eval": {"every": 0},
        "output_dir": str(root / name),
        "seed": 5,
    }
    for section, values in sections.items():
        cfg[section] = {**cfg[section], **values} if isinstance(cfg.get(section), dict) else values
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


SELECTED_MLP = r"model\.layers\.1\.mlp\."
RESUMED = ("fsdp-qlora", "fsdp-full")  # resumed by the driver from a copy of their step-3 checkpoint
RUNS = {  # name -> sections; each trained by 2 ranks in the fixture's one torchrun launch
    "ddp": {},
    # generation eval calls the unwrapped model's generate(): FSDP's root parameters must be gathered for it
    "fsdp": {"distributed": {"strategy": "fsdp"}, "eval": {"every": 3, "max_examples": 2, "max_new_tokens": 4}},
    "ddp-qlora": {"adapter": {"method": "qlora"}},
    "fsdp-qlora": {"adapter": {"method": "qlora"}, "distributed": {"strategy": "fsdp"}, "train": {"save_every": 3}},
    "ddp-dora": {"adapter": {"method": "dora"}},
    "fsdp-dora": {"adapter": {"method": "dora"}, "distributed": {"strategy": "fsdp"}},
    "ddp-full": {"adapter": {"method": "full"}, "data": {"packing": False}},
    "fsdp-full": {"adapter": {"method": "full"}, "data": {"packing": False}, "distributed": {"strategy": "fsdp"},
                  "train": {"save_every": 3}},
    # prompt tuning: the one trained tensor (the virtual tokens) sits in the root module, outside every decoder layer
    "ddp-prompt_tuning": {"adapter": {"method": "prompt_tuning", "num_virtual_tokens": 4}, "train": {"lr": 0.05}},
    "fsdp-prompt_tuning": {"adapter": {"method": "prompt_tuning", "num_virtual_tokens": 4}, "train": {"lr": 0.05},
                           "distributed": {"strategy": "fsdp"}, "eval": {"every": 3, "max_examples": 2, "max_new_tokens": 4}},
    "ddp-ia3": {"adapter": {"method": "ia3"}},
    "fsdp-ia3": {"adapter": {"method": "ia3"}, "distributed": {"strategy": "fsdp"}},
    # selective: base tensors train (here block 1's MLP and every norm), FSDP shards them with the frozen rest
    "ddp-selective": {"adapter": {"method": "selective", "trainable": [SELECTED_MLP, r"norm\.weight$"]}},
    "fsdp-selective": {"adapter": {"method": "selective", "trainable": [SELECTED_MLP, r"norm\.weight$"]},
                       "distributed": {"strategy": "fsdp"}},
    # the KL anchor to the base (train.kl_to_base): the reference pass runs inside DDP's / FSDP's forward too
    "ddp-kl": {"train": {"kl_to_base": {"weight": 1.0, "on": "all"}}},
    "fsdp-kl": {"train": {"kl_to_base": {"weight": 1.0, "on": "all"}}, "distributed": {"strategy": "fsdp"}},
    # the uninterrupted reference of the resume test (dropout on: each rank's RNG must be restored)
    "resume-ref": {"adapter": {"dropout": 0.1}, "train": {"max_steps": 12, "save_every": 3, "eval_every": 0}},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import save_tiny_model_dir
    from tests.train.test_train_cli import write_chat_data

    root = tmp_path_factory.mktemp("distributed")
    save_tiny_model_dir(root / "model")
    write_chat_data(root / "train.jsonl", n=64)
    return root


@pytest.fixture(scope="module")
def distributed_runs(workspace: Path) -> dict[str, Any]:
    configs = [str(write_config(workspace, name, **sections)) for name, sections in RUNS.items()]
    out = workspace / "results.json"
    proc = torchrun(__file__, "runs", str(out), *configs)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    selective = run_dir / "adapter" / "selective.safetensors"  # adapter.method selective: lorakit's own file
    return load_file(str(selective if selective.exists() else run_dir / "adapter" / "adapter_model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_ddp_2_ranks_equal_one_process_with_the_doubled_batch(workspace: Path, distributed_runs: dict) -> None:
    from lorakit.config import load_config
    from lorakit.train.loop import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank has (OMP_NUM_THREADS=1); spares a shared CPU
    try:
        single = train(load_config(write_config(workspace, "single", train={"batch_size": 4})), quiet=True)
    finally:
        torch.set_num_threads(threads)
    ddp = distributed_runs["ddp"]
    assert len(ddp["losses"]) == len(single.losses) == STEPS
    for step, (got, want) in enumerate(zip(ddp["losses"], single.losses), start=1):
        assert abs(got - want) <= 1e-5, (step, got, want)
    assert ddp["eval_loss"] == pytest.approx(single.eval_loss, abs=1e-5)
    ddp_adapter, single_adapter = adapter_weights(workspace / "ddp"), adapter_weights(workspace / "single")
    assert max_diff(ddp_adapter, single_adapter) <= 1e-5
    assert max(float(v.abs().max()) for k, v in ddp_adapter.items() if "lora_B" in k) > 1e-3  # it did train
    # the same PEFT directory as a single-process run; rank 0 alone wrote the run directory
    assert sorted(p.name for p in (workspace / "ddp" / "adapter").iterdir()) == \
        sorted(p.name for p in (workspace / "single" / "adapter").iterdir())
    assert json.loads((workspace / "ddp" / "adapter" / "adapter_config.json").read_text()) == \
        json.loads((workspace / "single" / "adapter" / "adapter_config.json").read_text())
    events = [json.loads(line) for line in (workspace / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"] == list(range(1, STEPS + 1))
    start = next(e for e in events if e["event"] == "start")
    assert start["world_size"] == 2 and start["strategy"] == "ddp"
    single_events = [json.loads(line) for line in (workspace / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [e["tokens"] for e in events if e["event"] == "train"] == \
        [e["tokens"] for e in single_events if e["event"] == "train"]  # token counts are global


@pytest.mark.parametrize("method", ["lora", "qlora", "dora", "full", "ia3", "selective", "prompt_tuning"])
def test_fsdp_equals_ddp(workspace: Path, distributed_runs: dict, method: str) -> None:
    suffix = "" if method == "lora" else f"-{method}"
    ddp, fsdp = distributed_runs[f"ddp{suffix}"], distributed_runs[f"fsdp{suffix}"]
    for step, (got, want) in enumerate(zip(fsdp["losses"], ddp["losses"]), start=1):
        assert abs(got - want) <= 1e-5, (step, got, want)
    assert fsdp["eval_loss"] == pytest.approx(ddp["eval_loss"], abs=1e-5)
    if method in ("lora", "prompt_tuning"):  # generation with the virtual tokens prefilled, FSDP's root gathered
        events = [json.loads(line) for line in (workspace / f"fsdp{suffix}" / "metrics.jsonl").read_text().splitlines()]
        assert [e["step"] for e in events if e["event"] == "gen_eval"] == [3, STEPS]
    if method == "full":
        from safetensors.torch import load_file

        a = load_file(str(workspace / "fsdp-full" / "model" / "model.safetensors"))
        b = load_file(str(workspace / "ddp-full" / "model" / "model.safetensors"))
        assert max_diff(a, b) <= 1e-5
    else:
        assert max_diff(adapter_weights(workspace / f"fsdp{suffix}"), adapter_weights(workspace / f"ddp{suffix}")) <= 1e-5
    if method == "prompt_tuning":  # the virtual tokens trained (a root parameter under FSDP) and were gathered
        assert list(adapter_weights(workspace / "fsdp-prompt_tuning")) == ["prompt_embeddings"]
        assert fsdp["losses"][-1] < fsdp["losses"][0]
    if method == "dora":  # the magnitudes trained (sharded under FSDP) and were gathered into PEFT's keys
        assert sum(k.endswith(".lora_magnitude_vector") for k in adapter_weights(workspace / "fsdp-dora")) == 14
    if method == "ia3":
        assert sum(k.endswith(".ia3_l") for k in adapter_weights(workspace / "fsdp-ia3")) == 6
    if method == "selective":  # the whole tensors, gathered from FSDP's shards
        assert len(adapter_weights(workspace / "fsdp-selective")) == 3 + 5
    # the checkpoint holds whole tensors in the single-process layout (FSDP's shards gathered)
    from safetensors.torch import load_file

    ckpt = workspace / f"fsdp{suffix}" / "checkpoints" / f"step-{STEPS}"
    ddp_ckpt = workspace / f"ddp{suffix}" / "checkpoints" / f"step-{STEPS}"
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        assert max_diff(load_file(str(ckpt / name)), load_file(str(ddp_ckpt / name))) <= 1e-5


def test_kl_anchor_under_ddp_and_fsdp_equals_one_process(workspace: Path, distributed_runs: dict) -> None:
    from lorakit.config import load_config
    from lorakit.train.loop import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(load_config(write_config(workspace, "single-kl", train={
            "batch_size": 4, "kl_to_base": {"weight": 1.0, "on": "all"}})), quiet=True)
    finally:
        torch.set_num_threads(threads)

    def kls(name: str) -> list[float]:
        events = [json.loads(line) for line in (workspace / name / "metrics.jsonl").read_text().splitlines()]
        return [e["kl"] for e in events if e["event"] == "train"]

    want = kls("single-kl")
    assert len(want) == STEPS and abs(want[0]) < 1e-6 and max(want) > 1e-6
    for name in ("ddp-kl", "fsdp-kl"):
        got = distributed_runs[name]
        for step, (a, b) in enumerate(zip(got["losses"], single.losses), start=1):
            assert abs(a - b) <= 1e-5, (name, step, a, b)
        assert kls(name) == pytest.approx(want, rel=1e-3, abs=2e-5), name  # a KL of ~1e-3 is a difference of near-equal logs


@pytest.mark.parametrize("name", RESUMED)
def test_fsdp_resume_loads_the_gathered_checkpoint_back_into_shards(distributed_runs: dict, name: str) -> None:
    """Steps 4-6 after resuming an FSDP run from its step-3 checkpoint are those of the uninterrupted run."""
    resumed, whole = distributed_runs[f"{name}-resumed"]["losses"], distributed_runs[name]["losses"]
    assert len(resumed) == STEPS - 3
    for step, (got, want) in enumerate(zip(resumed, whole[3:]), start=4):
        assert abs(got - want) <= 1e-6, (step, got, want)


def test_fsdp_shards_the_nf4_weights(distributed_runs: dict) -> None:
    """QLoRA under FSDP2: each rank holds half of the NF4 codes and scales, not a replica."""
    probe = distributed_runs["probe"]
    assert probe["kinds"] == ["DTensor"]  # codes, block absmax, double-quant scales: sharded parameters
    assert sum(probe["local_bytes"]) == probe["full_bytes"]
    assert max(probe["local_bytes"]) <= 0.51 * probe["full_bytes"]
    assert probe["loss_sharded"] == pytest.approx(probe["loss_plain"], rel=1e-6)


def test_resume_after_kill_under_ddp_matches_the_uninterrupted_run(workspace: Path, distributed_runs: dict) -> None:
    expected = distributed_runs["resume-ref"]["losses"]
    cfg = write_config(workspace, "killed", **RUNS["resume-ref"])
    torchrun_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.Popen([*torchrun_cmd, "-m", "lorakit", "train", str(cfg)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = workspace / "killed" / "checkpoints"
    deadline = time.time() + TIMEOUT
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists() and any(p.name.startswith("step-") for p in ckpt.iterdir()):
                break
            time.sleep(0.005)
    finally:
        ranks = descendants(proc.pid)  # torchrun starts each rank in a session of its own
        for pid in [proc.pid, *ranks]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        while any(Path(f"/proc/{pid}").exists() and "Z" not in _proc_state(pid) for pid in ranks):
            time.sleep(0.01)
    assert proc.returncode == -signal.SIGKILL and len(ranks) >= 2, "the run finished before it could be killed"
    killed_at = max(int(p.name.split("-")[1]) for p in ckpt.iterdir() if p.name.startswith("step-"))
    assert killed_at < len(expected) and not (workspace / "killed" / "adapter").exists()

    resumed = lorakit("train", str(cfg), "--nproc", "2", "--resume")  # the convenience launcher this time
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"(step {killed_at})" in resumed.stdout.replace("\n", " "), resumed.stdout
    events = [json.loads(line) for line in (workspace / "killed" / "metrics.jsonl").read_text().splitlines()]
    got = {e["step"]: e["loss"] for e in events if e["event"] == "train"}
    assert sorted(got) == list(range(1, len(expected) + 1))
    for step, want in enumerate(expected, start=1):
        assert abs(got[step] - want) <= 1e-6, (step, got[step], want)
    assert (workspace / "killed" / "adapter" / "adapter_model.safetensors").exists()


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_a_rank_with_bad_data_stops_the_job_with_its_error(workspace: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": a}]} for a in ("yo", "")]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = write_config(workspace, "failing")
    start = time.time()
    proc = torchrun(__file__, "rank1-reads", str(bad), "train", str(cfg), timeout=TIMEOUT)
    assert proc.returncode != 0
    assert time.time() - start < TIMEOUT  # no hang: rank 0, waiting in a collective, was brought down
    assert "error: rank 1: " in proc.stderr and "bad.jsonl row 2" in proc.stderr, proc.stderr[-3000:]
    assert "rank 1: exit code 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (workspace / "failing" / "adapter").exists()


def test_distributed_config_and_launcher_errors(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    from lorakit.cli import main
    from lorakit.config import load_config
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match="distributed.strategy: must be one of 'ddp', 'fsdp', got 'zero3'"):
        load_config(None, ["distributed.strategy=zero3"])
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(write_config(workspace, "nproc0")), "--nproc", "0"])
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: --nproc must be >= 1, got 0\n"
    with pytest.raises(SystemExit) as exit_info:  # bad config: reported once, before any process starts
        main(["train", str(write_config(workspace, "nproc2")), "--nproc", "2", "--set", "distributed.strategy=zero3"])
    assert exit_info.value.code == 2 and capsys.readouterr().err.count("error: ") == 1


def test_each_rank_gets_its_slice_of_the_global_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks 0 and 1 with batch b together hold exactly the rows of one process's batch of 2b."""
    from lorakit.data import PackedSequence, TokenizedExample
    from lorakit.train.distributed import rank_batches

    def rows(batch: dict) -> list[list[int]]:
        return [[t for t in row if t != 0] for row in batch["input_ids"].tolist()]  # padding (id 0) stripped

    lengths = torch.randint(2, 30, (23,), generator=torch.Generator().manual_seed(0)).tolist()
    ids = [[100 * i + j for j in range(1, n + 1)] for i, n in enumerate(lengths)]  # every row distinct
    plain = [TokenizedExample(input_ids=x, labels=x, truncated=False, num_trained=len(x) - 1) for x in ids]
    packed = [PackedSequence(input_ids=x, labels=x, position_ids=list(range(len(x))), num_examples=1) for x in ids]
    for items in (plain, packed):
        monkeypatch.setenv("WORLD_SIZE", "1")
        monkeypatch.setenv("RANK", "0")
        whole = rank_batches(items, 6, 0, seed=1, epoch=2)  # one process, batch 2b
        monkeypatch.setenv("WORLD_SIZE", "2")
        parts = []
        for r in (0, 1):
            monkeypatch.setenv("RANK", str(r))
            parts.append(rank_batches(items, 3, 0, seed=1, epoch=2))  # rank r, batch b
        assert len(parts[0]) == len(parts[1]) == len(whole)  # 23 rows: the last batch has 5, split 2 + 3
        for k, batch in enumerate(whole):
            assert rows(batch) == rows(parts[0][k]) + rows(parts[1][k])
            assert int(batch["num_real"]) == int(parts[0][k]["num_real"]) + int(parts[1][k]["num_real"])


# ----------------------------------------------------------------------------- the driver (run by torchrun)


def _probe_nf4_sharding() -> dict[str, Any]:
    """A tiny QLoRA model sharded with FSDP2: where the NF4 bytes live, and the loss before and after."""
    from lorakit.adapters import inject_lora
    from lorakit.config import DistributedConfig
    from lorakit.quant import quantize_model_linears
    from lorakit.train import distributed as dist
    from lorakit.train.loss import fast_loss_sum
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    quantize_model_linears(model, "nf4", compute_dtype=torch.float32)
    inject_lora(model, ["all-linear"], r=4, alpha=8)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    with torch.no_grad():
        plain = float(fast_loss_sum(model, batch)[0])
    loss_fn = dist.parallelize(model, fast_loss_sum, DistributedConfig(strategy="fsdp"), torch.device("cpu"), None)
    quantized = [p for m in model.modules() if isinstance(m, QuantizedLinear)
                 for name, p in m.named_parameters(recurse=False) if name != "bias"]
    local = sum(p.to_local().numel() * p.element_size() for p in quantized)
    gathered: list[Any] = [None] * dist.world_size()
    torch.distributed.all_gather_object(gathered, local)
    with torch.no_grad():
        sharded = float(loss_fn(model, batch)[0])
    return {"kinds": sorted({type(p).__name__ for p in quantized}), "local_bytes": gathered,
            "full_bytes": sum(p.numel() * p.element_size() for p in quantized),
            "loss_plain": plain, "loss_sharded": sharded}


def _drive(argv: list[str]) -> None:
    from lorakit.config import load_config
    from lorakit.train import distributed as dist
    from lorakit.train.loop import train

    if argv[0] == "rank1-reads":  # rank1-reads BAD_DATA lorakit-args...: rank 1 trains on another file
        from lorakit.cli import main

        extra = ["--set", f"data.train={argv[1]}"] if os.environ.get("RANK") == "1" else []
        main([*argv[2:], *extra])
        return
    assert argv[0] == "runs"  # runs OUT.json CONFIG...: train each config, rank 0 writes the losses
    results: dict[str, Any] = {}
    for path in argv[2:]:
        result = train(load_config(path), quiet=True)
        results[Path(path).stem] = {"losses": result.losses, "eval_loss": result.eval_loss}
    for path in [p for p in argv[2:] if Path(p).stem in RESUMED]:
        src = Path(load_config(path).output_dir)
        dst = src.with_name(f"{src.name}-resumed")
        if dist.is_main():  # the run as a kill after step 3 would have left it
            shutil.copytree(src / "checkpoints" / "step-3", dst / "checkpoints" / "step-3")
            shutil.copy(src / "config.yaml", dst / "config.yaml")
        dist.barrier()
        result = train(load_config(path, [f"output_dir={dst}"]), resume=True, quiet=True)
        results[dst.name] = {"losses": result.losses, "eval_loss": result.eval_loss}
    results["probe"] = _probe_nf4_sharding()
    if dist.is_main():
        Path(argv[1]).write_text(json.dumps(results))
    dist.teardown()


if __name__ == "__main__":
    _drive(sys.argv[1:])
