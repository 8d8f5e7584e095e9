"""Sentences and candidate answer spans of a window, found without a model (answer-first synth qa).

A weak teacher cannot choose what to ask about; the answer-first strategy (Alberti et al. 2019,
PAQ: Lewis et al. 2021) chooses for it. `sentences` cuts a window's text into units a question
can rest on: prose sentences, and markdown list items with the section heading they stand under
("Corrie Wren (flagship): Passengers: 212 passengers"); headings, table rows and code fences are
left out, and a sentence that opens with a pronoun ("It flashes white every 9 seconds.") is kept
together with the sentence before it, which says what the pronoun is.

`answer_spans` finds, in one unit, the kinds of short answers a question is usually about:
money (£4.60, 27 pounds, 80p, $12), times (6:40, 9 am), dates (28 October, March 2021, years
such as 1958), other numbers with the noun they count (37 households, 95 minutes, 2,400 hours),
capitalised names (Ottilie Brandvoll, Fiddler's Light, a capitalised word inside a sentence),
quoted terms, and the noun phrase after "is the" / "was a" ("the chief engineer"), which lets
a relation be asked from both ends (who is the chief engineer; what is Dagny Thorsvik's job).
Overlapping spans keep the longest; spans come in the order of the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MONTHS = ("January February March April May June July August September October November December "
          "Jan Feb Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec").split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_MONTH = "|".join(MONTHS)
_DAY = "|".join(DAYS)
_NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_PATTERNS: list[tuple[str, re.Pattern]] = [
    ("money", re.compile(rf"[£$€]\s?(?:{_NUM})|\b(?:{_NUM})\s?(?:p|pence|pounds?|dollars?|euros?|cents?)\b")),
    ("time", re.compile(r"\b\d{1,2}[:.]\d{2}(?:\s?[ap]\.?m\.?)?(?!\d)|\b\d{1,2}\s?[ap]\.?m\b\.?")),
    ("date", re.compile(rf"\b\d{{1,2}}(?:st|nd|rd|th)?\s(?:{_MONTH})\b(?:\s\d{{4}})?|\b(?:{_MONTH})\s\d{{1,2}}(?:st|nd|rd|th)?"
                        rf"\b(?:,?\s\d{{4}})?|\b(?:{_MONTH})\s\d{{4}}\b")),
    ("date", re.compile(rf"\b(?:first|second|third|fourth|last)\s(?:{_DAY})\s(?:in|of)\s(?:{_MONTH})\b")),
    ("day", re.compile(rf"\b(?:{_DAY})s?(?:(?:,\s|\sand\s|\sor\s)(?:{_DAY})s?)*\b")),
    ("year", re.compile(r"(?<![\d,.£$€])\b(?:1[5-9]\d\d|20\d\d)\b(?!\d|[,.]\d)")),
    ("quantity", re.compile(rf"(?<![\d,.£$€:])\b(?:{_NUM})(?:\s?%|\s(?:per\s?cent|percent))?"
                            r"(?:[\s-][a-z][a-z'-]*(?:\s[a-z][a-z'-]*s\b)?)?(?![\d])")),
    ("quoted", re.compile(r"[\"“]([^\"”]{2,40})[\"”]")),
]
_CAPITAL = r"[A-Z][\w'’-]*"
_NAME = re.compile(rf"{_CAPITAL}(?:\s(?:of|the|de|van|von|on|upon)\s{_CAPITAL}|\s{_CAPITAL})*")
_COPULA = re.compile(r"\b(?:is|was|are|were)\s(?:the|a|an|our|their|its|his|her)\s((?:[a-z][\w'’-]*\s?){1,4})")
_COPULA_STOP = frozenset("""and or but who which that whom whose at in on for to with from by since because as
when where while he she it they we""".split())
_UNIT_STOP = frozenset("""and or but the a an of in on at to for by from with is are was were has have had
per each every than that which who as it its their our his her this these those""".split())
_OPENERS = frozenset("""the a an this that these those it its our their his her we you they he she i in on at
for by from with to of every each all some any no one if when where while after before during since as and
but or so there here what which who how why""".split())
_PRONOUN_START = re.compile(r"^(?:It|Its|She|He|Her|His|They|Their|This|These|That|Those|There)\b")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[“]?[A-Z0-9£$€])")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*)$")
_LIST_ITEM = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+(.*)$")
_MARKUP = re.compile(r"\*\*|__|`|(?<!\w)[*_](?=\S)|(?<=\S)[*_](?!\w)")
_SECTION_NUMBER = re.compile(r"^\d+(?:\.\d+)*\s+")
_CALENDAR = frozenset(w.lower() for w in MONTHS + DAYS)


@dataclass(frozen=True)
class Span:
    text: str
    kind: str
    """money, time, date, year, quantity, quoted, name or role."""
    start: int
    end: int


def _clean(line: str) -> str:
    return " ".join(_MARKUP.sub("", line).split())


def sentences(text: str, min_words: int = 4) -> list[str]:
    """The units of `text` a question can rest on, in order (see the module's docstring)."""
    out: list[str] = []
    heading, fenced, paragraph = "", False, []

    def flush() -> None:
        if paragraph:
            for s in _SENTENCE_END.split(" ".join(paragraph)):
                s = s.strip()
                if out and out[-1] and _PRONOUN_START.match(s):
                    out[-1] = f"{out[-1]} {s}"
                elif s:
                    out.append(s)
            paragraph.clear()

    for raw in text.splitlines():
        line = raw.strip()
        if not paragraph and out and not line.startswith(("```", "|", "#")) and line:
            out.append("")  # a paragraph's first sentence is never joined to the one before
        if line.startswith("```"):
            flush()
            fenced = not fenced
            continue
        if fenced or line.startswith("|") or not line:
            flush()
            continue
        if m := _HEADING.match(line):
            flush()
            heading = _SECTION_NUMBER.sub("", _clean(m.group(1)))
            continue
        if m := _LIST_ITEM.match(line):
            flush()
            item = _clean(m.group(1))
            out.append(f"{heading}: {item}" if heading and ":" in item else item)
            continue
        paragraph.append(_clean(line))
    flush()
    return [s for s in out if s and len(s.split()) >= min_words]


def name_spans(sentence: str) -> list[Span]:
    """Capitalised names in `sentence` (a lone capitalised word only inside a sentence), without leading "The"."""
    spans = []
    for m in _NAME.finditer(sentence):
        words = m.group(0).split()
        start = m.start()
        while words and words[0].lower() in _OPENERS:  # "The Corrie Wren" -> "Corrie Wren"
            start += len(words[0]) + 1
            words = words[1:]
        while words and words[-1].lower() in ("of", "the", "and", "on", "upon", "de", "van", "von"):
            words = words[:-1]
        if words and words[-1].endswith(("'s", "’s")):
            words[-1] = words[-1][:-2]  # "the Pipit's timetable" -> "Pipit"
        if not words or any(w.rstrip("s").lower() in _CALENDAR for w in words):
            continue
        first_word = sentence[:start].strip() == "" or bool(re.search(r"[.:!?]\s*$", sentence[:start]))
        if len(words) == 1 and (first_word or words[0] == "I"):
            continue  # a capital at a sentence's start is no sign of a name
        text = " ".join(words).rstrip("'’")
        spans.append(Span(text, "name", start, start + len(text)))
    return spans


def _roles(sentence: str) -> list[Span]:
    spans = []
    for m in _COPULA.finditer(sentence):
        words = []
        for w in m.group(1).split():
            if w in _COPULA_STOP:
                break
            words.append(w)
        if words:
            text = " ".join(words).rstrip(",;.")
            spans.append(Span(text, "role", m.start(1), m.start(1) + len(text)))
    return spans


def _unit(parts: list[str]) -> str:
    """A number with the noun it counts: "37 households", "74 nautical miles"; not "9 and", "2009 and sails"."""
    keep = parts[:1]
    if len(parts) > 1 and parts[1].split("-")[0] not in _UNIT_STOP:
        keep.append(parts[1])
        if len(parts) > 2 and not parts[1].endswith("s") and parts[2] not in _UNIT_STOP:
            keep.append(parts[2])  # "nautical miles", not "boats rescued"
    return " ".join(keep)


def answer_spans(sentence: str, limit: int = 0) -> list[Span]:
    """Candidate answers in `sentence`, longest first where they overlap, in text order (at most `limit`; 0: all)."""
    found: list[Span] = []
    for kind, pattern in _PATTERNS:
        for m in pattern.finditer(sentence):
            g = 1 if pattern.groups else 0
            text = m.group(g).strip()
            if kind == "quantity":
                text = _unit(text.split())
            if text:
                found.append(Span(text, kind, m.start(g), m.start(g) + len(text)))
    found += name_spans(sentence) + _roles(sentence)
    kept: list[Span] = []
    for s in sorted(found, key=lambda s: (-(s.end - s.start), s.start)):  # longest first wins overlaps
        if all(s.end <= k.start or s.start >= k.end for k in kept):
            kept.append(s)
    kept.sort(key=lambda s: s.start)
    return kept[:limit] if limit else kept
