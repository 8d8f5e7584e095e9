"""`lorakit synth qa`'s parts: documents, windows, JSON replies, filters, splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.config import SynthConfig
from lorakit.errors import DataError
from lorakit.synth.documents import Document, approx_tokens, find_documents, read_documents, windows
from lorakit.synth.filters import filter_candidates, grounded, ngrams, words
from lorakit.synth.pairs import Candidate, fact_candidates, parse_json, unanswerable_candidates
from lorakit.synth.splits import split
from tests.synth.qa_fixtures import DOC


def pdf_bytes(text: str | None) -> bytes:
    """A one-page PDF (Helvetica text, or no text at all), with a correct xref table."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode() if text else b""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


def test_every_document_type_and_folder_walk(tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.md").write_text("# A\n\nAlpha text.")
    (docs / "sub" / "b.html").write_text("<html><head><style>p{}</style><script>var x=1;</script></head>"
                                         "<body><h1>Title</h1><p>Beta &amp; gamma.</p></body></html>")
    (docs / "c.jsonl").write_text(json.dumps({"text": "Row one."}) + "\n\n" + json.dumps({"text": "Row two."}) + "\n")
    (docs / "d.pdf").write_bytes(pdf_bytes("Delta is in the PDF."))
    (docs / "e.png").write_bytes(b"\x89PNG")
    (docs / ".hidden.txt").write_text("not read")
    files, skipped = find_documents([docs])
    assert [f.name for f in files] == ["a.md", "c.jsonl", "d.pdf", "b.html"] and [f.name for f in skipped] == ["e.png"]
    got = {d.file.replace(str(docs) + "/", ""): d.text for d in read_documents(files)}
    assert got == {"a.md": "# A\n\nAlpha text.", "c.jsonl#row 1": "Row one.", "c.jsonl#row 3": "Row two.",
                   "d.pdf": "Delta is in the PDF.", "sub/b.html": "Title\n\nBeta & gamma."}


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("empty.md", "  \n", "is empty; remove it or fill it in"),
    ("scan.pdf", pdf_bytes(None), "has no text layer (a scanned PDF?); run OCR on it first"),
    ("broken.pdf", b"%PDF-1.4 garbage", "is not a readable PDF"),
    ("notes.docx", b"PK", "unknown document type '.docx'"),
    ("rows.jsonl", '{"body": "x"}\n', "has no text column 'text'; set synth.text_column"),
    ("latin1.txt", "caf\xe9".encode("latin-1"), "is not UTF-8 text"),
])
def test_bad_documents_are_named(tmp_path: Path, name: str, content: str | bytes, needle: str) -> None:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match="^" + str(path).replace(".", r"\.")) as err:
        read_documents(find_documents([path])[0])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_windows_keep_spans_fit_and_overlap() -> None:
    text = DOC + "\n" + " ".join(f"Sentence number {i} says that item {i} costs {i} pounds." for i in range(40))
    doc = Document("doc.md", text)
    ws = windows([doc], 60, 20)
    assert len(ws) > 5 and [w.index for w in ws] == list(range(len(ws)))
    for w in ws:
        assert text[w.start:w.end] == w.text and approx_tokens(w.text) <= 60
    assert all(b.start < a.end for a, b in zip(ws, ws[1:]) if b.start > ws[3].start)  # the long paragraph overlaps
    assert ws[0].text.startswith("# Gull Point") and "Mara Quill" in ws[0].text
    assert all(w.text.rstrip()[-1] in ".t" for w in ws)  # cut at sentence ends ("...Point" heading aside)
    one = windows([doc], 100000, 0)
    assert len(one) == 1 and one[0].text == text.strip()
    giant = Document("g.txt", "word " * 500)
    assert all(approx_tokens(w.text) <= 50 for w in windows([giant], 50, 0))  # no sentence end: cut at words


def test_parse_json_is_lenient_about_the_wrapping() -> None:
    assert parse_json('Sure!\n```json\n{"facts": [1]}\n```\nDone.') == {"facts": [1]}
    assert parse_json('[{"question": "q"}] trailing') == [{"question": "q"}]
    assert parse_json("{not json} then {\"a\": 1}") == {"a": 1}
    assert parse_json("no json here") is None and parse_json("{}") is None
    cut = '{"facts": [{"question": "Q1?", "answer": "A", "reversed": {"question": "R?"}}, {"question": "Q2?", "answer": "B"}, {"question": "Q3?", "ans'
    assert parse_json(cut) == [{"question": "Q1?", "answer": "A", "reversed": {"question": "R?"}},
                               {"question": "Q2?", "answer": "B"}]  # what came before the cut


def test_candidates_from_replies() -> None:
    reply = {"facts": [{"question": "Q1?", "answer": "A1", "fact": "F1", "paraphrases": ["P1?", ""],
                        "reversed": {"question": "R1?", "answer": "RA", "fact": "RF"}},
                       {"question": "Q2?", "answer": "A2 is a long answer without its fact string."}, "junk",
                       {"question": "Q4?", "answer": "Ada Moss."},
                       {"question": "Q3?", "answer": "A3", "fact": "F3", "reversed": None}]}
    cands, incomplete = fact_candidates(reply, 4, 10, "no.")
    assert incomplete == 2
    assert [(c.variant, c.question, c.group, c.window) for c in cands] == [
        ("question", "Q1?", 10, 4), ("paraphrase", "P1?", 10, 4), ("reverse", "R1?", 10, 4), ("question", "Q4?", 11, 4),
        ("question", "Q3?", 12, 4)]
    assert cands[3].fact == "Ada Moss"  # a short answer without a fact is its own fact
    un = unanswerable_candidates({"questions": ["U1?", {"question": "U2?"}, 3]}, 1, 20, "no.")
    assert [(c.kind, c.question, c.answer, c.fact, c.group) for c in un] == [
        ("refusal", "U1?", "no.", "no.", 20), ("refusal", "U2?", "no.", "no.", 21)]


def test_grounding_exact_and_fuzzy() -> None:
    window = "The Corrie Wren was built in 2009 at the Aberlune shipyard."
    assert grounded("the corrie wren", window, 0.9) and grounded("Aberlune shipyard", window, 0.9)
    assert grounded("Aberlunne shipyard", window, 0.9)  # a typo: fuzzy
    assert not grounded("Aberdeen shipyard", window, 0.9) and not grounded("2010", window, 0.9)
    assert not grounded("200", window, 0.99)  # whole words only


def _c(kind: str, q: str, a: str, f: str, group: int, variant: str = "question") -> Candidate:
    return Candidate(kind, variant if kind == "fact" else "unanswerable", q, a, f, 0, group)


def test_each_filter_counts_its_reason() -> None:
    window = "The Corrie Wren was built in 2009 at the Aberlune shipyard. Lost property is kept for 60 days."
    cfg = SynthConfig()
    cands = [
        _c("fact", "When was the Corrie Wren built?", "It was built in 2009.", "2009", 0),
        _c("fact", "When was it?", "In 2009.", "2009", 1),  # 3 words: kept (min 3)
        _c("fact", "Why?", "Because.", "Because", 2),
        _c("fact", "Who owns the Corrie Wren today?", "I can't answer that from the handbook.", "owner", 3),
        _c("fact", "Where was the Corrie Wren built?", "It was built in Scotland.", "Aberlune", 4),
        _c("fact", "Who captains the Corrie Wren?", "Captain Morag Tulloch does.", "Morag Tulloch", 5),
        _c("refusal", "How long is lost property kept?", cfg.refusal, cfg.refusal, 6),
        _c("refusal", "What colour is the Corrie Wren's funnel?", cfg.refusal, cfg.refusal, 7),
        _c("fact", "When was the Corrie Wren built ?", "In 2009.", "2009", 8),  # same words: duplicate
        _c("fact", "When exactly was the Corrie Wren built?", "In 2009.", "2009", 9),  # Jaccard 0.4: kept
        _c("refusal", "What was the name of the keeper's dog?", cfg.refusal, cfg.refusal, 10),  # the prompt's
        _c("refusal", "So what is the name of the keeper's dog?", cfg.refusal, cfg.refusal, 11),  # a variant of it
        _c("refusal", "What is the answer to the question?", cfg.refusal, cfg.refusal, 12),  # no key terms
    ]
    kept, counts, rejected = filter_candidates(cands, {0: window}, [window], cfg)
    assert [c.group for c in kept] == [0, 1, 7, 9]
    assert dict(counts) == {"prompt example": 2, "length": 1, "refusal in a fact row": 1, "answer lacks fact": 1,
                            "ungrounded": 1, "answerable": 2, "duplicate": 1}
    assert [why for _, why in rejected] == ["length", "refusal in a fact row", "answer lacks fact", "ungrounded",
                                            "answerable", "duplicate", "prompt example", "prompt example",
                                            "answerable"]
    strict = SynthConfig(dedup_jaccard=0.3)
    kept, counts, _ = filter_candidates(cands, {0: window}, [window], strict)
    assert counts["duplicate"] == 2


def test_splits_hold_out_other_wordings_and_respect_the_ngram_guard() -> None:
    rows = []
    for g in range(30):
        rows += [_c("fact", f"What is the code of depot number {g}?", f"Depot {g} has code X{g}.", f"X{g}", g),
                 _c("fact", f"Tell me which code depot {g} uses?", f"Depot {g} has code X{g}.", f"X{g}", g, "paraphrase")]
    # shares "what is (the) code of depot number" (6 words) with a trained question: never held out
    rows.append(_c("fact", "Which code is it?", "Code Y.", "Y", 98))
    rows.append(_c("fact", "What is the code of depot number ninety nine?", "Code Y.", "Y", 98, "paraphrase"))
    rows += [_c("refusal", f"Who paints depot {g} in spring each year?", "no.", "no.", 100 + g) for g in range(10)]
    parts = split(rows, 1.0, 0.5, 6, seed=0)
    assert len(parts.train) + len(parts.heldout) + len(parts.unanswerable) == len(rows)
    assert {c.group for c in parts.heldout} <= {c.group for c in parts.train}  # other wordings of trained facts
    assert all(c.kind == "fact" for c in parts.heldout) and all(c.kind == "refusal" for c in parts.unanswerable)
    trained = set()
    for c in parts.train:
        trained |= ngrams(words(c.question), 6) | ngrams(words(c.answer), 6)
    assert all(not ngrams(words(c.question), 6) & trained for c in parts.heldout + parts.unanswerable)
    assert parts.moved >= 1 and 98 not in {c.group for c in parts.heldout}
    trained_q = {c.question for c in parts.train}
    assert not trained_q & {c.question for c in parts.heldout}
    assert split(rows, 1.0, 0.5, 6, seed=0) == parts and split(rows, 1.0, 0.5, 6, seed=1) != parts


def test_synth_config_is_validated() -> None:
    from lorakit.config import load_config
    from lorakit.errors import ConfigError

    assert load_config(None, ["synth.refusal=Not in the manual."]).synth.refusal == "Not in the manual."
    with pytest.raises(ConfigError) as err:
        load_config(None, ["synth.overlap_tokens=500", "synth.dedup_jaccard=0", "synth.concurrency=0",
                           "synth.windows=3"])
    text = str(err.value)
    for needle in ("synth.overlap_tokens: must be < window_tokens", "synth.dedup_jaccard: must be in (0, 1]",
                   "synth.concurrency: must be >= 1", "synth.windows"):
        assert needle in text


def test_plain_text_replies_are_read_as_a_last_resort() -> None:
    from lorakit.synth.pairs import parse_text

    text = "Question: Who founded it?\n\nAnswer: Ottilie Brandvoll.\n2. **Q2:** When?\n**A:** In 1958, in spring."
    assert parse_text(text, "facts") == [{"question": "Who founded it?", "answer": "Ottilie Brandvoll."},
                                         {"question": "When?", "answer": "In 1958, in spring."}]
    lines = "Here you go:\n1. What is the keeper's dog called?\n2. What is the keeper's dog called?\n- Who paints it?"
    assert parse_text(lines, "unanswerable") == {"questions": ["What is the keeper's dog called?", "Who paints it?"]}
    assert parse_text("The Vessany Sound is a chain of islands.", "facts") is None
    assert parse_text("No questions.", "unanswerable") is None
