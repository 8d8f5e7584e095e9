"""report.html: renders from a full or a bare run directory, offline, escaped; the CLI; a screenshot."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lorakit.eval.report import pick_samples, write_report
from tests.conftest import run_cli

CONFIG = """model:
  name: tiny-llama-for-report
adapter:
  method: lora
  r: 8
  alpha: 16
  target_modules: [q_proj, v_proj]
train:
  max_steps: 6
  lr: 0.0002
output_dir: runs/report-test
"""
EVIL = "<script>alert('x')</script> & more"


def _events() -> list[dict]:
    events = [{"event": "start", "step": 0, "total_steps": 6, "examples": 40, "eval_examples": 10, "sequences": 12,
               "trainable_params": 16384, "adapted_modules": 4, "device": "cpu", "precision": "fp32",
               "real_token_fraction": 0.93}]
    for step in range(1, 7):
        events.append({"event": "train", "step": step, "epoch": step / 6, "loss": 3.0 - 0.3 * step,
                       "lr": 2e-4 * (1 - step / 7), "grad_norm": 1.1, "tokens": 512 * step,
                       "trained_tokens": 200 * step,
                       "tokens_per_s": 900.0 + step, "elapsed": 0.5 * step, "rss_mb": 800.0 + step,
                       "peak_rss_mb": 810.0 + step})
        if step % 3 == 0:
            events.append({"event": "eval", "step": step, "eval_loss": 2.9 - 0.2 * step, "eval_ppl": 10.0 / step})
            events.append({"event": "gen_eval", "step": step, "n": 8,
                           "metrics": {"fact": 0.1 * step, "rougeL": 0.05 * step}})
    events.append({"event": "end", "step": 6, "eval_loss": 1.7, "eval_ppl": 5.47, "best_eval_loss": 1.7,
                   "train_loss_last": 1.2, "tokens": 3072, "trained_tokens": 1200, "elapsed_s": 3.0,
                   "trained_tokens_per_s": 400.0, "peak_rss_mb": 816.0})
    return events


def _compare() -> dict:
    examples = [
        {"prompt": f"question {i}?", "reference": f"answer {i}",
         "outputs": {"base": f"base says {i}", "tuned": EVIL if i == 0 else f"tuned says {i}"},
         "scores": {"base": {"fact": 0.0 if i < 3 else 1.0}, "tuned": {"fact": 1.0 if i < 4 else 0.0}}}
        for i in range(6)
    ]
    return {
        "labels": ["base", "tuned"],
        "summary": [{"metric": "held-out fact accuracy", "values": {"base": 0.0234, "tuned": 0.6178},
                     "higher_is_better": True},
                    {"metric": "general perplexity", "values": {"base": 12.3, "tuned": None},
                     "higher_is_better": False}],
        "datasets": {"heldout": {"path": "examples/x/heldout.jsonl", "n": 6,
                                 "metrics": {"fact": {"base": 0.03, "tuned": 0.62},
                                             "rougeL": {"base": 0.1, "tuned": 0.5}},
                                 "examples": examples}},
        "forgetting": {"perplexity": {"base": 12.3, "tuned": 13.1}, "retention": {"tuned": 0.95}, "threshold": 0.9,
                       "warnings": ["general perplexity rose 6.5% <check>"]},
    }


def make_run(root: Path, full: bool = True) -> Path:
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(CONFIG)
    lines = [json.dumps(e) for e in _events()]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n" + '{"event": "train", "st' + "\n")  # a cut line
    if full:
        (run / "eval.json").write_text(json.dumps(_events()[-1]))
        (run / "compare.json").write_text(json.dumps(_compare()))
        (run / "adapter").mkdir()
        (run / "adapter" / "adapter_config.json").write_text(json.dumps(
            {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
             "base_model_name_or_path": "tiny-llama-for-report", "peft_type": "LORA"}))
    return run


class Page(HTMLParser):
    """Collects tags, their attributes and the visible text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> tuple[str, Page]:
    source = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(source)
    page.close()
    return source, page


def test_full_report_renders_offline_and_escaped(tmp_path: Path) -> None:
    path = write_report(make_run(tmp_path))
    assert path == tmp_path / "run" / "report.html"
    source, page = parse(path)
    text = " ".join(page.text)

    images = [a["src"] for t, a in page.tags if t == "img"]
    assert len(images) == 5  # loss, lr, generation metrics, throughput, memory
    for src in images:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1])
        assert png.startswith(b"\x89PNG") and len(png) > 5000
    for tag, attrs in page.tags:
        for name in ("src", "href"):
            assert not (attrs.get(name) or "").startswith(("http://", "https://", "//")), (tag, attrs)
    assert "http://" not in source and "https://" not in source
    assert not any(t in ("script", "link", "iframe") for t, _ in page.tags)

    # the before/after table: values, the better one highlighted, a missing value shown as a dash
    assert "held-out fact accuracy" in text and "0.0234" in text and "0.6178" in text
    best = [i for i, (t, a) in enumerate(page.tags) if a.get("class") == "best"]
    assert best
    assert '<span class="best">0.6178' in source
    assert "—" in text
    # samples: the model output is shown as text, never markup
    assert EVIL in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in source
    assert "tuned wins: fact +1" in text and "tuned loses: fact -1" in text
    assert "general perplexity rose 6.5% <check>" in text  # forgetting warning, escaped
    # config, header, key numbers, eval over steps
    assert "target_modules:" in text and "tiny-llama-for-report" in text
    assert "r 8, alpha 16, targets q_proj, v_proj" in text
    assert "16,384" in text and "1,200" in text and "816 MB" in text
    assert "rougeL" in text and "What is missing" in text  # the cut metrics line is reported
    assert "did not parse" in text


def test_bare_run_renders_and_says_what_is_missing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(CONFIG)
    (run / "metrics.jsonl").write_text(json.dumps(_events()[0]) + "\n" + json.dumps(_events()[1]) + "\n")
    _, page = parse(write_report(run))
    text = " ".join(page.text)
    assert "compare.json is missing" in text and "no end summary" in text
    assert "adapter/adapter_config.json is missing" in text
    assert [t for t, _ in page.tags if t == "img"]  # one train event still draws curves
    assert "no eval events" in text and "target_modules:" in text


def test_empty_metrics_renders(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    _, page = parse(write_report(run))
    text = " ".join(page.text)
    assert "config.yaml is missing" in text and "no train events" in text
    assert not [t for t, _ in page.tags if t == "img"]


def test_summary_built_from_datasets_and_three_labels(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    cmp = _compare()
    del cmp["summary"]
    cmp["labels"] = ["base", "tuned", "other"]
    cmp["datasets"]["heldout"]["metrics"]["fact"]["other"] = 0.9
    (run / "compare.json").write_text(json.dumps(cmp))
    source, page = parse(write_report(run))
    assert "heldout: fact" in " ".join(page.text)
    assert '<span class="best">0.9' in source


def test_pick_samples_wins_then_losses_then_the_rest() -> None:
    examples = _compare()["datasets"]["heldout"]["examples"]  # deltas: +1, +1, +1, 0, -1, -1
    picked = pick_samples(examples, ["base", "tuned"], None, k=4)  # None: the first metric scored
    assert [ex["prompt"] for _, ex in picked] == ["question 0?", "question 1?", "question 4?", "question 5?"]
    assert [tag for tag, _ in picked][1:3] == ["tuned wins: fact +1", "tuned loses: fact -1"]
    only_wins = pick_samples(examples[:4], ["base", "tuned"], "fact", k=4)  # no losses: more wins, then a tie
    assert [tag.split(":")[0] for tag, _ in only_wins] == ["tuned wins"] * 3 + [""]
    unscored = [{"prompt": "p", "outputs": {"base": "a", "tuned": "b"}}]
    assert pick_samples(unscored, ["base", "tuned"], None) == [("", unscored[0])]


def test_cli_report(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    proc = run_cli("report", str(run))
    assert proc.returncode == 0, proc.stderr
    assert (run / "report.html").stat().st_size > 10_000
    assert "report.html" in proc.stdout


@pytest.mark.parametrize("what", ["missing", "no-metrics"])
def test_cli_report_errors(tmp_path: Path, what: str) -> None:
    target = tmp_path / "nope"
    if what == "no-metrics":
        target.mkdir()
    proc = run_cli("report", str(target))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    assert ("does not exist" if what == "missing" else "no metrics.jsonl") in lines[0]


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="no /usr/bin/chromium (make test installs it when root)")
def test_screenshot_is_not_blank(tmp_path: Path) -> None:
    from PIL import Image

    path = write_report(make_run(tmp_path))
    png = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={png}", "--window-size=1200,2000",
           path.resolve().as_uri()]
    try:
        subprocess.run(cmd, capture_output=True, timeout=120, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.skip("chromium did not finish within 120 s")
    assert png.exists(), "chromium wrote no screenshot"
    if os.environ.get("LORAKIT_KEEP_SCREENSHOT"):
        shutil.copy(png, os.environ["LORAKIT_KEEP_SCREENSHOT"])
    with Image.open(png) as img:
        assert img.size == (1200, 2000)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # None: more colours than that
