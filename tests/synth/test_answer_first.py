"""The answer-first strategy of `lorakit synth qa`: the span extractor, the round trip, and the strategy end to end
against a live OpenAI-compatible server on 127.0.0.1 (the official client; no mocks of it), cached and resumable."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import pytest

from lorakit.errors import LorakitError
from lorakit.synth.answer_first import (QUESTION_EXAMPLES, example_words, first_question, question_prompt,
                                        round_trip)
from lorakit.synth.qa import QAOptions, choose_strategy, synth_qa
from lorakit.synth.spans import Span, answer_spans, sentences
from lorakit.synth.teacher import Teacher
from tests.synth.answer_first_fixtures import respond
from tests.synth.openai_server import TeacherServer
from tests.synth.qa_fixtures import SETTINGS, write_doc


def _spans(sentence: str) -> list[tuple[str, str]]:
    return [(s.text, s.kind) for s in answer_spans(sentence)]


@pytest.mark.parametrize("sentence, expected", [
    ("The library was founded in 1958 by Ottilie Brandvoll, a weaver from Kelvack.",
     [("library", "role")][:0] + [("1958", "year"), ("Ottilie Brandvoll", "name"), ("Kelvack", "name")]),
    ("An adult single costs £4.60 and a bicycle costs 80p; members pay 27 pounds a year.",
     [("£4.60", "money"), ("80p", "money"), ("27 pounds", "money")]),
    ("The first bus leaves at 6:40, the last at 9 pm, and the market opens on 28 October.",
     [("6:40", "time"), ("9 pm", "time"), ("28 October", "date")]),
    ("The network is 74 nautical miles long and 2,400 hours of sea time are needed; 37 households paid.",
     [("74 nautical miles", "quantity"), ("2,400 hours", "quantity"), ("37 households", "quantity")]),
    ("Dagny Thorsvik is the chief engineer and looks after the engines.",
     [("Dagny Thorsvik", "name"), ("chief engineer", "role")]),
    ("Tobias Grennock is the chair of the board and leads its meetings.",
     [("Tobias Grennock", "name"), ("chair of the board", "role")]),
    ('The motto is "Every Tide, Every Isle" and the meeting is on the second Saturday in March.',
     [("Every Tide, Every Isle", "quoted"), ("second Saturday in March", "date")]),
    ("The ferry sails on Tuesdays and Fridays from the Lantern Jetty at Fiddler's Light.",
     [("Tuesdays and Fridays", "day"), ("Lantern Jetty", "name"), ("Fiddler's Light", "name")]),
    ("Crew must complete a full safety drill once a month.", []),  # a capital at the start is no name
    ("Fewer sailings run in winter, and the Pipit's timetable depends on the tide.", [("Pipit", "name")]),
])
def test_answer_spans_by_kind(sentence: str, expected: list[tuple[str, str]]) -> None:
    assert _spans(sentence) == expected
    for s in answer_spans(sentence):
        assert sentence[s.start:s.end] == s.text  # offsets point into the sentence


def test_spans_do_not_overlap_and_the_longest_wins() -> None:
    spans = answer_spans("The Corrie Wren was built in 2009 and sails 13 knots; in February 1974 the old ferry sank.")
    assert [s.text for s in spans] == ["Corrie Wren", "2009", "13 knots", "February 1974"]
    assert all(a.end <= b.start for a, b in zip(spans, spans[1:]))
    assert len(answer_spans("Ann Lee met Bo Kim at 6:40 on 3 May in 1999 with 12 dogs.", limit=2)) == 2


def test_sentences_of_markdown() -> None:
    text = """# 4. The fleet

The Pipit is the smallest boat. She carries up to 36 passengers.

It was built in 1990 at the Drumlin Slip.

### 4.1 Corrie Wren (flagship)

- Passengers: 212 passengers
- Café: the Galley Hatch

| Role | Name |
|---|---|
| Chief engineer | Dagny Thorsvik |

```
code = 1
```
The **Broad Meg** is the cargo barge. Dogs are welcome on deck.
"""
    assert sentences(text) == [
        "The Pipit is the smallest boat. She carries up to 36 passengers.",  # the pronoun's sentence joined
        "It was built in 1990 at the Drumlin Slip.",  # a paragraph's first sentence never is
        "Corrie Wren (flagship): Passengers: 212 passengers",  # a list item under its heading
        "Corrie Wren (flagship): Café: the Galley Hatch",
        "The Broad Meg is the cargo barge.", "Dogs are welcome on deck.",
    ]


def _normalise(text: str) -> str:  # SQuAD normalisation, written out again for the check below
    text = "".join(" " if c in string.punctuation + "‘’“”" else c for c in text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


@pytest.mark.parametrize("reply, span, kind", [
    ("The engineer Mara Quill.", "Mara Quill", "name"), ("mara quill", "Mara Quill", "name"),
    ("Mara Quilling", "Mara Quill", "name"), ("It is 19 miles away.", "19 nautical miles", "quantity"),
    ("It is 119 miles away.", "19 nautical miles", "quantity"), ("In 1887.", "1887", "year"),
    ("In 18870.", "1887", "year"), ("£4.60 each way", "£4.60", "money"), ("It costs 4", "£4.60", "money"),
    ("The chair of the board.", "chair of the board", "role"), ("The board's chair", "chair of the board", "role"),
    ("2,400 hours", "2,400 hours", "quantity"), ("2,400", "2,400 hours", "quantity"), ("", "1887", "year"),
])
def test_round_trip_against_a_direct_computation(reply: str, span: str, kind: str) -> None:
    direct = f" {_normalise(span)} " in f" {_normalise(reply)} "
    if not direct and kind == "quantity":
        number = re.match(r"[\d,.]+", span).group(0)
        direct = f" {_normalise(number)} " in f" {_normalise(reply)} "
    assert round_trip(reply, Span(span, kind, 0, len(span))) is direct


def test_first_question_and_the_example_words() -> None:
    assert first_question("Question: Who built it?\nAnswer: Mara") == "Who built it?"
    assert first_question('"When does the museum open?"') == "When does the museum open?"
    assert first_question("Sure! Here is a question.\nWho built it?") == ""  # the first line is no question
    assert first_question("") == ""
    words = example_words()
    assert {"library", "bakery", "lopez", "1987"} <= words and not {"the", "open", "year", "am"} & words
    turns = question_prompt("The pier is 40 metres long.", "40 metres")
    assert [t["role"] for t in turns] == ["user", "assistant"] * len(QUESTION_EXAMPLES) + ["user"]
    assert turns[-1]["content"].startswith("Text: The pier is 40 metres long.\nAnswer: 40 metres\n")


def test_strategy_auto_follows_the_teachers_size() -> None:
    small, big, endpoint = Teacher(), Teacher(), Teacher()
    small.parameters, big.parameters = 135_000_000, 7_000_000_000
    assert [choose_strategy("auto", t) for t in (small, big, endpoint)] == ["answer_first", "json", "json"]
    assert choose_strategy("json", small) == "json" and choose_strategy("answer_first", endpoint) == "answer_first"
    with pytest.raises(LorakitError, match="strategy: must be one of auto, json, answer_first"):
        synth_qa(QAOptions([Path("x.md")], Path("out"), teacher="t", overrides=["synth.strategy=jsn"]))
    with pytest.raises(LorakitError, match="round_trip: must be contains or exclusive"):
        synth_qa(QAOptions([Path("x.md")], Path("out"), teacher="t", overrides=["synth.round_trip=strict"]))


def _run(server: TeacherServer, doc: Path, out: Path, *extra: str) -> dict:
    settings = [*SETTINGS, "synth.strategy=answer_first", *extra]
    synth_qa(QAOptions([doc], out, teacher_url=server.url, teacher_model="t", overrides=settings))
    return json.loads((out / "synth_report.json").read_text())


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_answer_first_end_to_end_cached_and_resumable(tmp_path: Path) -> None:
    doc = write_doc(tmp_path / "docs")
    with TeacherServer(respond) as server:
        report = _run(server, doc, tmp_path / "out", "synth.second_question=retry")
        # 8 (sentence, answer) items: 8 questions; 5 pass the checks and are answered back, 4 survive; the other 4
        # tried again blanked: 3 pass the checks, 2 survive their round trip; 2 rewordings of each of the 6 kept
        # (12 calls), 9 of them pass the checks and are answered back, 8 survive
        assert report["answer_first"] == {"sentence_answers": 8, "calls_by_stage": {
            "questions": 8, "questions round trip": 5, "questions (blank)": 4, "questions (blank) round trip": 3,
            "rewordings": 12, "rewordings round trip": 9}}
        # 41 calls, 39 asked: a rewording equal to its question has the same round trip, taken from the cache
        html = (tmp_path / "out" / "synth_report.html").read_text()
        assert "Answer-first: 8 (sentence, answer) pairs" in html and "questions (blank) round trip" in html
        assert report["calls"]["total"] == 41 and report["calls"]["cached"] == 2 and server.hits == 39
        rejected = report["rejected"]  # tries, not pairs: a pair lost twice counts twice
        assert {k: rejected[k] for k in ("no question", "question holds the answer", "prompt example", "round trip",
                                         "duplicate")} == {"no question": 4, "question holds the answer": 2,
                                                           "prompt example": 1, "round trip": 3, "duplicate": 2}
        out = tmp_path / "out"
        train, heldout, unanswerable = (_read(out / f"{n}.jsonl") for n in ("train", "heldout", "unanswerable"))
        facts = [r for r in train + heldout if r["kind"] == "fact"]
        assert len(facts) == 12 and {r["fact"] for r in facts} == {"Gull Point", "Mara Quill", "19 nautical miles",
                                                                   "1887", "10 o'clock"}
        text = doc.read_text()
        for r in facts:  # the answer is the document's sentence, which holds the fact
            assert r["messages"][1]["content"] in " ".join(text.split()) and r["fact"] in r["messages"][1]["content"]
        assert all(r["variant"] == "paraphrase" for r in heldout) and heldout
        questions = {r["messages"][0]["content"] for r in facts}
        assert "In which year was the lighthouse built?" not in questions  # its round trip failed
        assert "When was the Gull Point lighthouse built?" in questions  # the blanked second try
        refusals = [r for r in train + unanswerable if r["kind"] == "refusal"]
        assert len(refusals) + rejected["answerable"] == 2  # names swapped for made-up ones, two per window at most
        for r in refusals:
            q = r["messages"][0]["content"]
            assert re.fullmatch(r"(Which lighthouse did \w+ Quill build in 1887|When was the \w+ Point lighthouse built)\?", q)
            assert q not in questions and r["messages"][1]["content"] == "I can't answer that from the handbook."

        before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".jsonl"}
        server.hits = 0
        again = _run(server, doc, out, "synth.second_question=retry")  # the same inputs: every call from the cache, the same files
        assert server.hits == 0 and again["calls"]["cached"] == 41
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".jsonl"} == before

        server.hits, server.good, server.fail_after = 0, 0, 10  # interrupted after 10 answers
        with pytest.raises(LorakitError, match="kept answering 500"):
            _run(server, doc, tmp_path / "cut", "synth.retries=0", "synth.concurrency=1", "synth.second_question=retry")
        server.hits, server.fail_after = 0, None
        resumed = _run(server, doc, tmp_path / "cut", "synth.concurrency=1", "synth.second_question=retry")
        assert server.hits == 39 - 10 and resumed["calls"]["cached"] == 10 + 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "cut").iterdir() if p.suffix == ".jsonl"} == before


def test_second_question_always_asks_every_pair_again_as_another_wording(tmp_path: Path) -> None:
    doc = write_doc(tmp_path / "docs")
    with TeacherServer(respond) as server:
        retry = _run(server, doc, tmp_path / "retry", "synth.second_question=retry", "synth.paraphrases=0")
        always = _run(server, doc, tmp_path / "always", "synth.paraphrases=0")  # the default
    assert retry["answer_first"]["calls_by_stage"]["questions (blank)"] == 4  # the 4 whose first try failed
    assert always["answer_first"]["calls_by_stage"]["questions (blank)"] == 8  # every pair
    rows = {name: [r for f in ("train", "heldout") for r in _read(tmp_path / name / f"{f}.jsonl") if r["kind"] == "fact"]
            for name in ("retry", "always")}
    first = {r["messages"][0]["content"] for r in rows["retry"]}
    assert first <= {r["messages"][0]["content"] for r in rows["always"]}  # the same fact questions, and more
    more = [r for r in rows["always"] if r["messages"][0]["content"] not in first]
    assert more and all(r["variant"] == "paraphrase" for r in more)
    asked = {(r["fact"], r["messages"][1]["content"]) for r in rows["retry"]}
    for r in more:  # another wording of a fact the first try already asked: the same fact and sentence
        assert (r["fact"], r["messages"][1]["content"]) in asked
    with pytest.raises(LorakitError, match="second_question: must be always or retry"):
        synth_qa(QAOptions([doc], tmp_path / "x", teacher="t", overrides=["synth.second_question=twice"]))


def test_exclusive_round_trip_fails_an_answer_that_copies_the_sentence() -> None:
    from lorakit.synth.answer_first import Item, other_spans

    sentence = "Our repair yard is the Drumlin Slip, at Corran Point, 2 kilometres south of Kelvack."
    item = Item(0, sentence, next(s for s in answer_spans(sentence) if s.text == "Kelvack"),
                "What is the name of the repair yard?")
    others = other_spans(item, 4)
    assert others == ["Drumlin Slip", "Corran Point", "2 kilometres"]
    copied = "Corran Point, 2 kilometres south of Kelvack"  # a real SmolLM2 answer (the handbook run's cache)
    assert round_trip(copied, item.span) and not round_trip(copied, item.span, others)
    assert round_trip("It is Kelvack.", item.span, others)
    named = Item(0, "Dagny Thorsvik is the chief engineer.", Span("chief engineer", "role", 22, 36),
                 "What is Dagny Thorsvik's job?")  # the question names the other span: it may be in the answer
    assert other_spans(named, 4) == []
    assert round_trip("Dagny Thorsvik is the chief engineer.", named.span, other_spans(named, 4))


def test_statements_ask_about_the_sentences_no_kept_question_answers() -> None:
    from lorakit.synth.answer_first import Item, statements

    covered = "The Corrie Wren was built in 2009 at the Aberlune shipyard."
    lost = ["Fiddler's Light stands on Greyhorn Rock and flashes every 9 seconds.",
            "Fiddler's Light was lit by Ada Moss in 1902.",  # its first name is used already: the next one
            "The old ferry sank in shallow water."]  # no name: nothing to ask about
    items = [Item(0, s, sp) for s in [covered, *lost] for sp in answer_spans(s)]
    kept = [i for i in items if i.sentence == covered][:1]
    rows = statements(items, kept, 10)
    assert [(r.question, r.answer, r.fact, r.variant, r.group) for r in rows] == [
        ("Tell me about Fiddler's Light.", lost[0], "Greyhorn Rock", "statement", 10),
        ("What do you know about Ada Moss?", lost[1], "Fiddler's Light", "statement", 11),
    ]
