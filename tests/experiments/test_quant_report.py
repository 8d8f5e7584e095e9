"""`lorakit quantize report`: its numbers against a direct computation, bytes by hand, the HTML, the errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.experiments import quant_report as qr
from lorakit.experiments.quant_measure import Setting, measure_bytes
from lorakit.models.load import load_model
from tests.conftest import save_tiny_model_dir, tiny_tokenizer

TEXT = ("the quick brown fox jumps over the lazy dog. what is the capital of france? paris. "
        "hello world, how are you? ") * 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("quant-report") / "tiny")


def _direct(model: torch.nn.Module, windows: list[list[int]]) -> tuple[float, list[int]]:
    """Summed NLL and argmax predictions, computed here without the report's code."""
    nll, preds = 0.0, []
    with torch.no_grad():
        for w in windows:
            logits = model(torch.tensor([w])).logits[0].float()  # (T, V)
            nll += float(F.cross_entropy(logits[:-1], torch.tensor(w[1:]), reduction="sum"))
            preds += logits[:-1].argmax(-1).tolist()
    return nll, preds


def _hand_bytes(model: torch.nn.Module, linear: int, other: int) -> tuple[int, int, int, int]:
    """(linear params, linear bytes, other params, other bytes) with `linear`/`other` bytes per parameter."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    lp = sum(model.get_submodule(n).weight.numel() for n in names)
    total = sum(p.numel() for p in model.parameters())  # the tiny config's head is not tied
    return lp, lp * linear, total - lp, (total - lp) * other


def test_report_equals_a_direct_computation_and_writes_the_html(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = tmp_path / "out"
    opts = qr.ReportOptions(str(model_dir), text, ["nf4-dq"], [64], max_length=32, max_windows=3, gen_tokens=3,
                            out=out, threads=1)
    report = qr.quant_report(opts)
    assert json.loads((out / "quant_report.json").read_text()) == report
    fp32_row, nf4_row = report["rows"]
    assert (fp32_row["setting"], nf4_row["setting"]) == ("fp32", "nf4-dq/64")  # fp32 added as the reference

    ids = tiny_tokenizer()(TEXT, add_special_tokens=False)["input_ids"]
    windows = [ids[0:32], ids[32:64], ids[64:96]]
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    nll32, pred32 = _direct(reference, windows)
    quantized = load_model(str(model_dir), "bf16", with_tokenizer=False, quantization=Setting("nf4-dq", 64).quant_spec())
    nll4, pred4 = _direct(quantized.model, windows)
    assert report["scored_tokens"] == 93
    assert fp32_row["perplexity"] == pytest.approx(math.exp(nll32 / 93), rel=1e-5)
    assert nf4_row["perplexity"] == pytest.approx(math.exp(nll4 / 93), rel=1e-4)
    assert fp32_row["top1_agreement"] == 1.0
    assert nf4_row["top1_agreement"] == pytest.approx(sum(a == b for a, b in zip(pred4, pred32)) / 93, abs=1e-12)
    assert nf4_row["top1_agreement"] < 1.0  # the tiny random model's ties are fragile: quantization shows

    # bytes by hand: fp32 everything 4 bytes; NF4 + double quant per linear: codes, 1-byte absmax, scales, offset
    lp, lb, op, ob = _hand_bytes(reference, 4, 4)
    assert (fp32_row["linear_params"], fp32_row["linear_bytes"], fp32_row["other_params"], fp32_row["other_bytes"]) \
        == (lp, lb, op, ob)
    nf4_bytes = 0
    for m in (m for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"):
        n = m.weight.numel()
        blocks = math.ceil(n / 64)
        nf4_bytes += math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / 256) + 4
    assert nf4_row["linear_bytes"] == nf4_bytes and nf4_row["other_bytes"] == 2 * op
    assert nf4_row["linear_bits"] == pytest.approx(8 * nf4_bytes / lp)
    assert nf4_row["model_bits"] == pytest.approx(8 * (nf4_bytes + 2 * op) / (lp + op))
    assert nf4_row["load_peak_rss_mb"] > 0 and nf4_row["gen_tokens_per_s"] > 0

    page = (out / "quant_report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2 and "Perplexity against bits per parameter" in page
    assert "<script" not in page and "http" not in page.replace('http-equiv', '')
    assert "nf4-dq/64" in page

    with pytest.raises(LorakitError, match="already exists.*--force"):  # nothing overwritten without --force
        qr.quant_report(opts)


@pytest.mark.parametrize("method,linear", [("int8", None), ("fp4", None), ("bf16", 2)])
def test_bits_per_parameter_against_hand_computed_bytes(model_dir, method, linear):
    setting = Setting(method, 32 if method == "fp4" else None)
    model = load_model(str(model_dir), setting.load_dtype, with_tokenizer=False, quantization=setting.quant_spec()).model
    b = measure_bytes(model)
    reference = load_model(str(model_dir), "fp32", with_tokenizer=False).model
    lp, lb, op, ob = _hand_bytes(reference, 2, 2)
    layers = [m for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    if method == "int8":  # one int8 per weight + an fp32 scale per output row
        lb = sum(m.weight.numel() + 4 * m.out_features for m in layers)
    if method == "fp4":  # two codes per byte + an fp32 absmax per block of 32
        lb = sum(math.ceil(m.weight.numel() / 2) + 4 * math.ceil(m.weight.numel() / 32) for m in layers)
    assert (b.linear_params, b.linear_bytes, b.other_params, b.other_bytes) == (lp, lb, op, ob)
    assert b.linear_bits == pytest.approx(8 * lb / lp)


def run(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        main(["quantize", "report", *args])
    return int(exit_.value.code or 0), capsys.readouterr().err


def test_bad_input_is_a_one_line_error_before_any_work(model_dir, tmp_path, capsys, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("a setting ran despite bad input")

    monkeypatch.setattr(qr, "run_setting", no_work)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    short = tmp_path / "short.txt"
    short.write_text("hello world")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "quant_report.json").write_text("{}")
    m, t = str(model_dir), str(text)
    cases = [
        ([m, "--text", t, "--methods", "fp32,nf5"], "unknown method 'nf5'; did you mean 'nf4'?"),
        ([m, "--text", t, "--methods", "int8/64"], "int8 has no blocksize"),
        ([m, "--text", t, "--blocksize", "100"], "--blocksize '100' is not supported; use some of 32, 64, 128, 256"),
        ([m, "--text", t, "--methods", "nf4/48"], "--blocksize '48' is not supported"),
        ([m, "--text", str(tmp_path / "nope.txt")], "does not exist or is not a file"),
        ([m], "give --text FILE"),
        ([str(tmp_path / "no-model"), "--text", t, "--out", str(tmp_path / "o1")], "no-model"),
        ([m, "--text", str(short), "--out", str(tmp_path / "o2")], "shorter than one window of --max-length 512"),
        ([m, "--text", t, "--out", str(tmp_path / "taken")], "already exists; choose another --out or pass --force"),
        ([m, "--text", t, "--repeats", "0"], "--repeats is 0; it must be at least 1"),
    ]
    for args, message in cases:
        code, err = run(capsys, *args)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, err)
    assert (tmp_path / "taken" / "quant_report.json").read_text() == "{}"


def test_settings_and_windows():
    settings = qr.settings_for(qr.parse_methods("bf16,nf4,fp4-dq/128,int8"), qr.parse_blocksizes("32,64"))
    assert [s.label for s in settings] == ["fp32", "bf16", "nf4/32", "nf4/64", "fp4-dq/128", "int8"]
    assert qr.text_windows(list(range(10)), 4, None) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the short tail is left out
    assert qr.text_windows(list(range(10)), 4, 1) == [[0, 1, 2, 3]]
    spec = Setting("fp4-dq", 128).quant_spec()
    assert (spec.method, spec.blocksize, spec.double_quant, spec.compute_dtype) == ("fp4", 128, True, torch.bfloat16)


def test_rounds_take_the_median_of_timings_and_memory_and_fail_on_any_error():
    def result(speed: float, rss: float) -> dict:
        return {"setting": "nf4/64", "perplexity": 10.0, "gen_tokens_per_s": speed, "score_tokens_per_s": speed,
                "load_s": 1.0, "load_peak_rss_mb": rss, "run_peak_rss_mb": rss, "rss_before_load_mb": 100.0}

    row = qr.combine_rounds([result(3.0, 500), result(9.0, 700), result(4.0, 520)])
    assert (row["gen_tokens_per_s"], row["load_peak_rss_mb"], row["repeats"]) == (4.0, 520, 3)
    assert row["gen_tokens_per_s_rounds"] == [3.0, 9.0, 4.0] and row["perplexity_rounds"] == [10.0] * 3
    failed = {"setting": "nf4/64", "error": "boom"}
    assert qr.combine_rounds([result(3.0, 500), failed]) == failed
