"""What the teacher is asked per window, and how its JSON replies become candidate rows.

Two calls per window: fact questions (each with a short answer, the fact string it rests on,
other wordings, and the reversed question where the fact relates two named things), and
questions the window's subject invites but its text does not answer. Replies are read leniently
(code fences, prose around the JSON, a bare list instead of the object, a list cut off at
max_new_tokens); a reply with no JSON in it is asked once more with a reminder; when neither
reply holds JSON, "Question: ... Answer: ..." text (or one question per line) is read instead,
and counted; a reply with none of these is counted as malformed and skipped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

FACTS_PROMPT = """Read the text below and write {n} questions that the text answers.
For each question give:
- "answer": a short answer in one sentence, taken from the text;
- "fact": the key name, number or short phrase of the answer, copied exactly from the text;
- "paraphrases": {p} other ways to ask the same question;
- "reversed": when the fact links two named things, the question asked the other way round, with its "answer" and "fact"; otherwise null.

Reply with JSON only, in this shape:
{{"facts": [{{"question": "Who lit the lamp in 1902?", "answer": "The lamp was lit by Ada Moss in 1902.", "fact": "Ada Moss", "paraphrases": ["Which person lit the lamp in 1902?"], "reversed": {{"question": "What did Ada Moss do in 1902?", "answer": "In 1902 Ada Moss lit the lamp.", "fact": "lit the lamp"}}}}]}}

Text:
\"\"\"
{text}
\"\"\""""

UNANSWERABLE_PROMPT = """Read the text below. Write {n} questions that a reader of this text might ask about its subject but that the text does NOT answer: the answer must not be anywhere in the text.

Reply with JSON only, in this shape:
{{"questions": ["What was the name of the keeper's dog?"]}}

Text:
\"\"\"
{text}
\"\"\""""

SHORT_ANSWER = 6
"""Words: an answer this short, given without a fact string, is taken as the fact."""
RETRY_NOTE = "\n\nYour reply must be valid JSON only, in the shape shown, with no other text."
_FENCE = re.compile(r"```(?:json)?", re.IGNORECASE)


@dataclass
class Candidate:
    """One question/answer row before the filters."""

    kind: str
    """fact or refusal (the evaluator's kinds)."""
    variant: str
    """question, paraphrase, reverse (kind fact) or unanswerable (kind refusal)."""
    question: str
    answer: str
    fact: str
    window: int
    group: int
    """Rows of one fact (its question, other wordings, reversed question) share a group; splits keep groups apart."""


def facts_prompt(text: str, n: int, paraphrases: int) -> str:
    return FACTS_PROMPT.format(text=text, n=n, p=paraphrases)


def unanswerable_prompt(text: str, n: int) -> str:
    return UNANSWERABLE_PROMPT.format(text=text, n=n)


EXAMPLE_QUESTIONS = ("Who lit the lamp in 1902?", "Which person lit the lamp in 1902?", "What did Ada Moss do in 1902?",
                     "What was the name of the keeper's dog?")
"""The questions of the prompts' examples: a small teacher copies them, and the filters drop them."""


def parse_json(text: str) -> Any:
    """The first JSON object or list in `text` (fences and prose around it ignored), or None.

    A reply cut off mid-way (a teacher that ran to max_new_tokens) gives the list of the complete
    question objects before the cut.
    """
    text = _FENCE.sub("", text)
    decoder = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                value, _ = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict) and "question" in value:
                break  # one question object: the start of a list that may have been cut; collect them below
            if isinstance(value, (dict, list)) and value:
                return value
    items, i = [], 0
    while (i := text.find("{", i)) != -1:
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        if isinstance(value, dict) and "question" in value:
            items.append(value)
            i = end
        else:
            i += 1
    return items or None


_QA_TEXT = re.compile(  # "1. **Question 2:** ...", a newline (and blank lines), "**Answer:** ..."
    r"^[ \t]*(?:\d+[.)][ \t]*)?(?:\*\*)?Q(?:uestion)?[ \t]*\d*[ \t]*(?:\*\*)?[:.][ \t]*(?:\*\*)?(.+?)[ \t]*\n"
    r"(?:[ \t]*\n)*[ \t]*(?:\*\*)?A(?:nswer)?[ \t]*\d*[ \t]*(?:\*\*)?[:.][ \t]*(?:\*\*)?(.+)$",
    re.IGNORECASE | re.MULTILINE)
_QUESTION_LINE = re.compile(  # "- ...?", "2. ...?", "Question: ...?" on a line of its own
    r"^[ \t]*(?:[-*]|\d+[.)])?[ \t]*(?:Q(?:uestion)?[ \t]*\d*[ \t]*[:.])?[ \t]*(.{8,}?\?)[ \t]*$",
    re.IGNORECASE | re.MULTILINE)


def parse_text(text: str, what: str) -> Any:
    """The same content from a reply in plain text rather than JSON: "Question: ... / Answer: ..." pairs
    (facts), or one question per line (unanswerable); None when there is none."""
    if what == "facts":
        pairs = [{"question": q.strip(" *"), "answer": a.strip(" *")} for q, a in _QA_TEXT.findall(text)]
        return pairs or None
    questions = list(dict.fromkeys(q.strip() for q in _QUESTION_LINE.findall(text)))
    return {"questions": questions} if questions else None


def _str(value: Any) -> str:
    return " ".join(value.split()) if isinstance(value, str) else ""


def fact_candidates(data: Any, window: int, first_group: int, refusal: str) -> tuple[list[Candidate], int]:
    """Candidates from a facts reply, and how many of its items lacked a question, answer or fact."""
    items = data.get("facts", data.get("questions")) if isinstance(data, dict) else data
    if isinstance(data, dict) and "question" in data:
        items = [data]
    out: list[Candidate] = []
    incomplete = 0
    group = first_group
    for item in items if isinstance(items, list) else []:
        q, a, f = (_str(item.get(k)) if isinstance(item, dict) else "" for k in ("question", "answer", "fact"))
        if q and a and not f and len(a.split()) <= SHORT_ANSWER:  # a short answer is its own fact
            f = a.rstrip(".")
        if not (q and a and f):
            incomplete += 1
            continue
        out.append(Candidate("fact", "question", q, a, f, window, group))
        for p in item.get("paraphrases") or []:
            if _str(p):
                out.append(Candidate("fact", "paraphrase", _str(p), a, f, window, group))
        rev = item.get("reversed")
        if isinstance(rev, dict):
            rq, ra, rf = (_str(rev.get(k)) for k in ("question", "answer", "fact"))
            if rq and ra and rf:
                out.append(Candidate("fact", "reverse", rq, ra, rf, window, group))
        group += 1
    return out, incomplete


def unanswerable_candidates(data: Any, window: int, first_group: int, refusal: str) -> list[Candidate]:
    items = data.get("questions", data.get("facts")) if isinstance(data, dict) else data
    out = []
    for item in items if isinstance(items, list) else []:
        q = _str(item.get("question")) if isinstance(item, dict) else _str(item)
        if q:
            out.append(Candidate("refusal", "unanswerable", q, refusal, refusal, window, first_group + len(out)))
    return out
