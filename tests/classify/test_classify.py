"""Classification: label scoring, the head's PEFT interop, metrics, disagreement ranking, capture curve, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.classify.data import TaskSpec, label_set, read_rows
from lorakit.classify.disagree import capture_curve, rank_rows
from lorakit.classify.lm_label import grouped_logprobs, label_probabilities, label_sequences, sequence_logprobs
from lorakit.config import AdapterConfig
from lorakit.data.templates import render_prompt
from lorakit.errors import DataError, LorakitError
from lorakit.eval.classification import classification_metrics
from tests.conftest import tiny_lm_for, tiny_tokenizer


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- lm_label scoring


def direct_label_logprob(model, tok, spec: TaskSpec, text: str, label: str) -> float:
    """log p(label + <|im_end|> | prompt), one unpadded sequence, summed token by token."""
    prompt = render_prompt([{"role": "user", "content": spec.user_text(text)}], "chatml", tok)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    ids = tok(prompt + label + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[: len(p_ids)] == p_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(len(p_ids), len(ids)))


def test_label_scores_match_direct_computation():
    tok = tiny_tokenizer()
    model = tiny_lm_for(tok)
    spec = TaskSpec("lm_label", ["yes", "no way", "the fox"], "{text}? one of {labels}", template="chatml",
                    max_length=200)
    texts = ["the quick brown fox", "hello", "what is the capital of france and how are you today"]
    seqs = label_sequences(spec, texts, tok)
    got = sequence_logprobs(model, seqs, tok.pad_token_id, batch_size=4)  # mixed lengths in one left-padded batch
    want = [direct_label_logprob(model, tok, spec, t, lab) for t in texts for lab in spec.labels]
    np.testing.assert_allclose(got, want, atol=1e-4)
    groups = [seqs[i * 3 : (i + 1) * 3] for i in range(3)]  # the prompt once per row, then each label on its cache
    shared = grouped_logprobs(model, groups, tok.pad_token_id, batch_size=3)
    np.testing.assert_allclose([s for row in shared for s in row], want, atol=1e-4)
    probs = label_probabilities(model, tok, spec, texts, batch_size=2)
    expect = torch.softmax(torch.tensor(want, dtype=torch.float64).view(3, 3), dim=-1)
    torch.testing.assert_close(probs, expect, atol=1e-4, rtol=0)
    assert torch.allclose(probs.sum(-1), torch.ones(3, dtype=torch.float64))


# ----------------------------------------------------------------------------- head: PEFT interop


def tiny_seq_cls(kind: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "llama":
        cfg = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0)
        return tf.LlamaForSequenceClassification(cfg).eval()
    cfg = tf.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tf.BertForSequenceClassification(cfg).eval()


def batch():
    ids = torch.randint(1, 128, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = 0, 0  # a right-padded row: decoders read its last non-pad token
    return {"input_ids": ids, "attention_mask": mask}


def randomise(params) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_head_adapter_loads_in_peft_and_back(tmp_path, kind):
    from peft import LoraConfig, PeftModel, get_peft_model

    from lorakit.classify.head import add_lora, head_name, load_head_adapter, save_head_adapter

    ours = tiny_seq_cls(kind)
    add_lora(ours, AdapterConfig(r=4, alpha=8, dropout=0.0))
    randomise([p for p in ours.parameters() if p.requires_grad])  # LoRA A/B and the head
    save_head_adapter(ours, tmp_path / "ours", "tiny")
    config = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == [head_name(ours)]
    with torch.no_grad():
        want = ours(**batch()).logits
        peft_model = PeftModel.from_pretrained(tiny_seq_cls(kind), tmp_path / "ours").eval()
        torch.testing.assert_close(peft_model(**batch()).logits, want, atol=1e-5, rtol=0)

    theirs = get_peft_model(tiny_seq_cls(kind), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                           target_modules="all-linear"))
    randomise([p for p in theirs.parameters() if p.requires_grad])
    theirs.eval().save_pretrained(tmp_path / "theirs")
    loaded = tiny_seq_cls(kind)
    load_head_adapter(loaded, tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch()).logits, theirs(**batch()).logits, atol=1e-5, rtol=0)


def test_head_adapter_refuses_another_label_set(tmp_path):
    from lorakit.classify.head import add_lora, load_head_adapter, save_head_adapter

    model = tiny_seq_cls("llama")
    add_lora(model, AdapterConfig(r=4, alpha=8, dropout=0.0))
    save_head_adapter(model, tmp_path / "a", "tiny")
    import transformers as tf

    two = tf.LlamaForSequenceClassification(tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                            num_hidden_layers=2, num_attention_heads=4,
                                                            num_key_value_heads=2, num_labels=2, pad_token_id=0))
    with pytest.raises(LorakitError, match="another label set"):
        load_head_adapter(two, tmp_path / "a")


# ----------------------------------------------------------------------------- metrics


def test_metrics_against_hand_counts():
    labels = ["a", "b", "c"]
    gold = ["a", "a", "b", "c", "c", "c"]
    probs = np.array([[.9, .05, .05], [.3, .6, .1], [.2, .7, .1], [.1, .1, .8], [.5, .2, .3], [.05, .05, .9]])
    m = classification_metrics(gold, probs, labels)
    assert m["confusion"] == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    f1 = {"a": 2 * .5 * .5 / 1.0, "b": 2 * .5 * 1 / 1.5, "c": 2 * 1 * (2 / 3) / (1 + 2 / 3)}
    assert m["macro_f1"] == pytest.approx(sum(f1.values()) / 3)
    # ECE by hand: confidences .9 .6 .7 .8 .5 .9 -> bins 9, 6, 7, 8, 5, 9
    bins = {9: ([.9, .9], [1, 1]), 6: ([.6], [0]), 7: ([.7], [1]), 8: ([.8], [1]), 5: ([.5], [0])}
    ece = sum(len(c) / 6 * abs(np.mean(ok) - np.mean(c)) for c, ok in bins.values())
    assert m["ece"] == pytest.approx(ece)


# ----------------------------------------------------------------------------- disagreement ranking


def direct_rank(probs: np.ndarray) -> list[int]:
    m, n, k = probs.shape
    keys = []
    for i in range(n):
        votes = [int(np.argmax(probs[j, i])) for j in range(m)]
        entropy = -sum((votes.count(c) / m) * math.log(votes.count(c) / m) for c in set(votes))
        kls = [sum(probs[a, i, c] * math.log(probs[a, i, c] / probs[b, i, c]) for c in range(k))
               for a in range(m) for b in range(m) if a != b]
        keys.append((-round(entropy, 9), -round(sum(kls) / len(kls), 9), i))
    return [i for *_, i in sorted(keys)]


def random_probs(m: int, n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(m, n, k)) * 2
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def test_ranking_matches_vote_entropy_then_kl():
    probs = random_probs(3, 40, 3, seed=0)
    order, entropy, kl = rank_rows(probs)
    assert order.tolist() == direct_rank(probs)
    assert entropy[order[0]] >= entropy[order[-1]]
    agree = np.repeat(probs[:1], 3, axis=0)  # three identical models: no disagreement at all
    _, entropy, kl = rank_rows(agree)
    assert np.allclose(entropy, 0) and np.allclose(kl, 0)


def test_capture_curve_matches_direct_count():
    probs = random_probs(3, 30, 2, seed=1)
    gold = np.random.default_rng(2).integers(0, 2, size=30)
    order, _, _ = rank_rows(probs)
    cap = capture_curve(probs, gold, order, ["a", "b", "c"])
    wrong = [[int(np.argmax(probs[j, i]) != gold[i]) for j in range(3)] for i in range(30)]
    total = sum(map(sum, wrong))
    for n in (0, 3, 6, 15, 30):
        assert cap.model_errors[n] == pytest.approx(sum(sum(wrong[i]) for i in order[:n]) / total)
    majority = [int(sum(np.argmax(probs[j, i]) for j in range(3)) >= 2) for i in range(30)]  # 3 voters, 2 labels
    label_err = [majority[i] != gold[i] for i in range(30)]
    assert cap.total_label_errors == sum(label_err)
    assert cap.label_errors[6] == pytest.approx(sum(label_err[i] for i in order[:6]) / sum(label_err))
    point = cap.at(0.2)
    assert point["rows"] == 6 and point["random"] == pytest.approx(0.2)
    best = sorted((sum(w) for w in wrong), reverse=True)
    assert point["best_model_errors"] == pytest.approx(sum(best[:6]) / total)
    assert point["best_model_errors"] >= point["model_errors"]


# ----------------------------------------------------------------------------- bad input


def test_one_class_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    with pytest.raises(DataError, match="one class \\('x'\\)"):
        label_set(read_rows(path, "text", "label"), path, None)


def test_empty_text_names_the_row(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}, {"text": "  ", "label": "y"}])
    with pytest.raises(DataError, match="row 2: the text"):
        read_rows(path, "text", "label")


def test_label_outside_the_declared_set_names_row_and_label(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "z"}])
    with pytest.raises(DataError, match="row 2: label 'z' is not in classification.labels"):
        label_set(read_rows(path, "text", "label"), path, ["x", "y"])


def test_test_label_unseen_in_training(tmp_path):
    from lorakit.classify.run import labelled_split

    path = write_jsonl(tmp_path / "test.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "new"}])
    spec = TaskSpec("lm_label", ["x", "y"])
    with pytest.raises(DataError, match="row 2: label 'new' is not in the training data"):
        labelled_split(path, spec)
