"""Answer-first synth qa: the strategy for a small teacher (synth.strategy answer_first; auto picks it below 1B).

A 135M teacher cannot follow "write JSON question/answer pairs about this text" (it copies the
prompt's example, restates the text, repeats a line: bench/results/synth_qa-smollm2-handbook.md).
What the synthetic-QA literature does for weak generators (Alberti et al. 2019, roundtrip
consistency; Lewis et al. 2021, PAQ) splits the job so the model only does the part it can:

1. **Answers first, without a model.** Each window is cut into sentences and each sentence's
   candidate answers are found by rule (spans.py: numbers with units, dates, times, money, names,
   quoted terms, "X is the Y" roles), up to `spans_per_sentence`.
2. **One question per (sentence, answer).** A short plain-text prompt, with four worked examples
   as earlier chat turns (generic sentences, not from any user's documents); the reply's first line,
   `question_tokens` at most. Dropped: a reply that is no question ("no question"), a question that
   holds its own answer ("question holds the answer"), one that uses a word found only in the
   examples ("prompt example"). A pair dropped here or at its round trip gets one second try with
   the sentence's answer blanked out ("The winter timetable begins on ___ each year."; the cloze
   form of Lewis et al. 2019, unsupervised QA), which stops "What is <the answer>?" questions.
   With synth.second_question always (the default), every pair is also asked in the cloze form,
   and a second question that passes is kept as another wording of the first.
3. **Round trip.** The teacher answers its own question given the sentence (`answer_tokens`); the
   pair is kept only when that answer holds the extracted span (SQuAD-normalised, on word
   boundaries, as the evaluator's `fact` metric; for a number with its noun, the number alone
   counts): else "round trip".
   With synth.round_trip exclusive, the answer must also hold none of the sentence's other spans that the
   question does not name: a teacher that answers by copying the sentence fails it.
4. **Other wordings.** Each kept question is reworded by the teacher (`paraphrases` prompts, each
   with its own examples), and a rewording goes through the same checks and its own round trip.
   A relation is asked from both ends because both of its ends are answer spans ("Who is the
   chief engineer?" for the name, "What is Dagny Thorsvik's job?" for the role).
5. **Unanswerable questions by perturbation** (SQuAD 2.0-style): in a kept question, a name that
   the documents use is replaced by a made-up one (the first word of another name of the documents
   with this name's last word, "Corrie Wren" -> "Tarrow Wren") that occurs nowhere in the
   documents; the question is answered with the refusal. Up to `unanswerable_per_window` per
   window; the shared filters then drop those whose key terms one sentence still holds.

6. **Statements** (synth.statements): a sentence whose every pair was lost is asked about by its
   subject without the teacher ("Tell me about Fiddler's Light."), so what it says is trained too.

The training answer of a fact row is the sentence itself: grounded by construction, and it
holds the fact. Every call goes through `teacher.ask`, so it is cached and an interrupted run resumes.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lorakit.synth.pairs import Candidate
from lorakit.synth.spans import Span, answer_spans, sentences
from lorakit.synth.teacher import CallStats, Limits, Prompt, Teacher, TeacherCache, ask

SMALL_TEACHER = 1_000_000_000
"""Parameters: a local teacher below this gets the answer-first strategy under synth.strategy auto."""

QUESTION_EXAMPLES = (
    ("The library on Elm Street opens at 9 am on weekdays.", "9 am",
     "When does the library on Elm Street open on weekdays?"),
    ("The bakery was founded by Maria Lopez in 1987.", "Maria Lopez", "Who founded the bakery?"),
    ("The bakery was founded by Maria Lopez in 1987.", "1987", "In which year was the bakery founded?"),
    ("Peter Quill is the head gardener and looks after the rose beds.", "head gardener", "What is Peter Quill's job?"),
)
BLANK_EXAMPLES = (
    ("The bakery was founded by ___ in 1987.", "Who founded the bakery in 1987?"),
    ("The bakery was founded by Maria Lopez in ___.", "In which year did Maria Lopez found the bakery?"),
    ("The library on Elm Street opens at ___ on weekdays.", "What time does the library on Elm Street open on weekdays?"),
    ("The museum's largest room, the Blue Hall, holds ___.", "How many visitors does the Blue Hall hold?"),
    ("Peter Quill is the ___ and looks after the rose beds.", "What is Peter Quill's job?"),
)
ANSWER_EXAMPLES = (
    ("The library on Elm Street opens at 9 am on weekdays.", "When does the library open?", "9 am"),
    ("The bakery was founded by Maria Lopez in 1987.", "Who founded the bakery?", "Maria Lopez"),
    ("The museum's largest room is the Blue Hall, which holds 300 visitors.", "How many people fit in the Blue Hall?",
     "300 visitors"),
)
REWORD_EXAMPLES = (
    ("Reword this question: {q}",
     (("When does the library on Elm Street open on weekdays?", "At what time does the Elm Street library open on weekdays?"),
      ("Who founded the bakery?", "Which person started the bakery?"),
      ("How many visitors does the Blue Hall hold?", "What number of visitors fit in the Blue Hall?"))),
    ("Ask this question in other words: {q}",
     (("When does the library on Elm Street open on weekdays?", "On weekdays, what is the opening time of the library on Elm Street?"),
      ("Who founded the bakery?", "Who was the founder of the bakery?"),
      ("How many visitors does the Blue Hall hold?", "What is the capacity of the Blue Hall in visitors?"))),
)
REASONS = ("no question", "question holds the answer", "prompt example", "round trip")
_NUMBER = re.compile(r"\d[\d,.]*")
_POSSESSIVE = re.compile(r"['’]s\b")


def question_prompt(sentence: str, answer: str) -> list[dict[str, str]]:
    def ask_for(s: str, a: str) -> str:
        return f'Text: {s}\nAnswer: {a}\nWrite one question about the text whose answer is "{a}".'

    turns: list[dict[str, str]] = []
    for s, a, q in QUESTION_EXAMPLES:
        turns += [{"role": "user", "content": ask_for(s, a)}, {"role": "assistant", "content": q}]
    return turns + [{"role": "user", "content": ask_for(sentence, answer)}]


def blank_prompt(sentence: str, span: Span) -> list[dict[str, str]]:
    """The second try: the sentence with its answer blanked out (a cloze), to be turned into a question."""
    def ask_for(cloze: str) -> str:
        return f"Text: {cloze}\nWrite the question whose answer goes in the blank ___."

    turns: list[dict[str, str]] = []
    for cloze, q in BLANK_EXAMPLES:
        turns += [{"role": "user", "content": ask_for(cloze)}, {"role": "assistant", "content": q}]
    return turns + [{"role": "user", "content": ask_for(sentence[:span.start] + "___" + sentence[span.end:])}]


def answer_prompt(sentence: str, question: str) -> list[dict[str, str]]:
    def ask_for(s: str, q: str) -> str:
        return f"Text: {s}\nQuestion: {q}\nAnswer with a few words from the text."

    turns: list[dict[str, str]] = []
    for s, q, a in ANSWER_EXAMPLES:
        turns += [{"role": "user", "content": ask_for(s, q)}, {"role": "assistant", "content": a}]
    return turns + [{"role": "user", "content": ask_for(sentence, question)}]


def reword_prompt(question: str, which: int) -> list[dict[str, str]]:
    instruction, examples = REWORD_EXAMPLES[which % len(REWORD_EXAMPLES)]
    turns: list[dict[str, str]] = []
    for q, r in examples:
        turns += [{"role": "user", "content": instruction.format(q=q)}, {"role": "assistant", "content": r}]
    return turns + [{"role": "user", "content": instruction.format(q=question)}]


EXAMPLE_TOPICS = ("library", "bakery", "museum", "gardener", "visitors", "weekdays")
"""What the worked examples are about, besides their names and numbers."""


def example_words() -> set[str]:
    """The words a copied example gives itself away by: the examples' answers, names and numbers, and topics.

    Not every word of the examples: "open" or "year" in a question says nothing."""
    from lorakit.synth.filters import words

    texts = [t for ex in QUESTION_EXAMPLES + ANSWER_EXAMPLES + BLANK_EXAMPLES for t in ex]
    texts += [t for _, pairs in REWORD_EXAMPLES for pair in pairs for t in pair]
    found = {w for t in texts for s in answer_spans(t.replace("___", "")) if s.kind != "role" for w in words(s.text)
             if len(w) > 2}  # not "am" of "9 am"
    return found | set(EXAMPLE_TOPICS)


def first_question(reply: str) -> str:
    """The reply's first line that is a question, without a "Question:" label or quotes; "" when none."""
    for line in reply.splitlines():
        line = re.sub(r"^\s*(?:[-*]|\d+[.)])?\s*(?:\*\*)?(?:Question|Q)\s*\d*\s*(?:\*\*)?[:.]\s*", "", line,
                      flags=re.IGNORECASE).strip(" \"'“”*")
        if line.endswith("?") and len(line.split()) >= 2:
            return " ".join(line.split())
        if line:
            return ""
    return ""


def round_trip(reply: str, span: Span, exclusive: Sequence[str] = ()) -> bool:
    """The teacher's answer holds the span (normalised, on word boundaries; a number with its noun: the number),
    and none of `exclusive` (synth.round_trip exclusive: the sentence's other spans that the question does not name,
    so an answer that merely copies the sentence fails)."""
    from lorakit.eval.metrics import fact_match

    if any(fact_match(reply, other) for other in exclusive):
        return False
    if fact_match(reply, span.text):
        return True
    if span.kind == "quantity" and (m := _NUMBER.match(span.text)):
        return bool(fact_match(reply, m.group(0).rstrip(",.")))
    return False


def other_spans(item: Item, limit: int) -> list[str]:
    """The sentence's other answer spans that the question does not name (possessives aside)."""
    from lorakit.eval.metrics import fact_match

    question = _POSSESSIVE.sub("", item.question)
    return [s.text for s in answer_spans(item.sentence, limit) if s.text != item.span.text
            and not fact_match(question, _POSSESSIVE.sub("", s.text)) and not fact_match(item.span.text, s.text)]


@dataclass
class Item:
    window: int
    sentence: str
    span: Span
    question: str = ""


def _checked(question: str, item: Item, foreign: set[str]) -> str | None:
    """Why a written question is dropped before its round trip, or None."""
    from lorakit.eval.metrics import fact_match
    from lorakit.synth.filters import words

    if not question:
        return "no question"
    if fact_match(_POSSESSIVE.sub("", question), _POSSESSIVE.sub("", item.span.text)):  # "Alma Frost's" holds "Alma Frost"
        return "question holds the answer"
    if set(words(question)) & foreign - set(words(item.sentence)):
        return "prompt example"
    return None


class AnswerFirst:
    """The strategy's run: items -> questions -> round trip -> rewordings -> round trip -> perturbed questions."""

    def __init__(self, teacher: Teacher, cache: TeacherCache, stats: CallStats, cfg: Any,
                 progress: Callable[[int], None] | None = None, on_reply: Callable[[Any], None] | None = None) -> None:
        self.teacher, self.cache, self.stats, self.cfg = teacher, cache, stats, cfg
        self.grow, self.on_reply = progress, on_reply
        self.rejected: Counter = Counter({r: 0 for r in REASONS})
        self.calls: Counter = Counter()

    def _ask(self, stage: str, prompts: Sequence[Prompt], tokens: int) -> list[str]:
        if self.grow is not None:
            self.grow(len(prompts))
        self.calls[stage] += len(prompts)
        replies = ask(self.teacher, self.cache, prompts, self.stats, self.on_reply, Limits(tokens))
        return [r.text if r.error is None else "" for r in replies]

    def _written(self, stage: str, items: list[Item], questions: list[str], foreign: set[str]) -> list[tuple[int, Item]]:
        """(position in `items`, item with its new question) for each question that passes the checks and its round trip."""
        ready = []
        for n, (item, q) in enumerate(zip(items, questions)):
            why = _checked(q, item, foreign)
            if why is None:
                ready.append((n, Item(item.window, item.sentence, item.span, q)))
            else:
                self.rejected[why] += 1
        answers = self._ask(f"{stage} round trip", [answer_prompt(i.sentence, i.question) for _, i in ready],
                            self.cfg.answer_tokens)
        strict = self.cfg.round_trip == "exclusive"
        kept = [(n, i) for (n, i), a in zip(ready, answers)
                if round_trip(a, i.span, other_spans(i, self.cfg.spans_per_sentence) if strict else ())]
        self.rejected["round trip"] += len(ready) - len(kept)
        return kept

    def run(self, windows: Sequence[Any], documents: Sequence[str]) -> list[Candidate]:
        cfg = self.cfg
        items, seen = [], set()
        for w in windows:
            for s in sentences(w.text):
                for span in answer_spans(s, cfg.spans_per_sentence):
                    if (s, span.text) not in seen:  # overlapping windows repeat sentences
                        seen.add((s, span.text))
                        items.append(Item(w.index, s, span))
        self.items = len(items)
        foreign = example_words() - {t for d in documents for t in _terms(d)}
        questions = self._ask("questions", [question_prompt(i.sentence, i.span.text) for i in items],
                              cfg.question_tokens)
        first = self._written("questions", items, [first_question(q) for q in questions], foreign)
        done = {n for n, _ in first}
        # the cloze prompt: a second try for the items whose first question failed, and with
        # synth.second_question always, a second question (another wording) for every item
        again = list(range(len(items))) if cfg.second_question == "always" else [n for n in range(len(items))
                                                                                   if n not in done]
        blanked = self._ask("questions (blank)", [blank_prompt(items[n].sentence, items[n].span) for n in again],
                            cfg.question_tokens)
        second = self._written("questions (blank)", [items[n] for n in again], [first_question(q) for q in blanked],
                               foreign)
        by_item = {n: i for n, i in first}
        extra: dict[int, Item] = {}
        for k, i in second:
            n = again[k]
            if n in by_item:
                extra[n] = i  # the first try's question stays the fact's question; this is another wording
            else:
                by_item[n] = i
        order = sorted(by_item)
        kept = [by_item[n] for n in order]
        out = [Candidate("fact", "question", i.question, i.sentence, i.span.text, i.window, g) for g, i in enumerate(kept)]
        out += [Candidate("fact", "paraphrase", extra[n].question, extra[n].sentence, extra[n].span.text,
                          extra[n].window, g) for g, n in enumerate(order) if n in extra]
        for which in range(cfg.paraphrases):  # group g: the kept question g and its rewordings
            reworded = self._ask("rewordings", [reword_prompt(i.question, which) for i in kept], cfg.question_tokens)
            for g, i in self._written("rewordings", kept, [first_question(r) for r in reworded], foreign):
                out.append(Candidate("fact", "paraphrase", i.question, i.sentence, i.span.text, i.window, g))
        out += perturbed(kept, documents, cfg.unanswerable_per_window, cfg.refusal, cfg.seed, len(kept))
        if cfg.statements:
            out += statements(items, kept, len(kept) + len(out))
        return out


STATEMENT_FRAMES = ("Tell me about {}.", "What do you know about {}?")


def statements(items: Sequence[Item], kept: Sequence[Item], first_group: int) -> list[Candidate]:
    """synth.statements: a sentence no kept question answers is asked about by its subject, without the teacher.

    The round trip loses every pair of some sentences, and what they say is then never trained.
    Each such sentence gets one row "Tell me about <name>." / "What do you know about <name>?"
    (alternating) answered by the sentence, with the first name in it not yet used for such a row
    (so no two rows ask the same thing with different answers); its fact is the sentence's first
    other answer span. The demo's hand-written augmentation has the same kind ("statement")."""
    covered = {i.sentence for i in kept}
    used: set[str] = set()
    out: list[Candidate] = []
    for sentence in dict.fromkeys(i.sentence for i in items):
        if sentence in covered:
            continue
        spans = answer_spans(sentence)
        names = [sp.text for sp in spans if sp.kind == "name" and sp.text.lower() not in used]
        if not names:
            continue
        subject = names[0]
        fact = next((sp.text for sp in spans if sp.text != subject), subject)
        used.add(subject.lower())
        window = next(i.window for i in items if i.sentence == sentence)
        out.append(Candidate("fact", "statement", STATEMENT_FRAMES[len(out) % 2].format(subject), sentence, fact,
                             window, first_group + len(out)))
    return out


def _terms(text: str) -> set[str]:
    from lorakit.synth.filters import words

    return set(words(text))


def perturbed(kept: Sequence[Item], documents: Sequence[str], per_window: int, refusal: str, seed: int,
              first_group: int) -> list[Candidate]:
    """Unanswerable questions: a kept question with one of its document names swapped for a made-up one."""
    from lorakit.synth.filters import words
    from lorakit.synth.spans import name_spans

    if per_window < 1:
        return []
    corpus = " " + " ".join(" ".join(words(d)) for d in documents) + " "
    names = sorted({s.text for d in documents for s in _doc_names(d)})
    rng = random.Random(seed)
    out: list[Candidate] = []
    per: Counter = Counter()
    for item in kept:
        if per[item.window] >= per_window:
            continue
        for span in name_spans(item.question):
            if f" {' '.join(words(span.text))} " not in corpus:
                continue
            last = span.text.split()[-1]
            others = [n for n in names if n.split()[0] not in (span.text.split()[0], last)]
            rng.shuffle(others)
            made_up = next((f"{o.split()[0]} {last}" for o in others
                            if f" {' '.join(words(o.split()[0] + ' ' + last))} " not in corpus), None)
            if made_up is None:
                continue
            q = item.question[:span.start] + made_up + item.question[span.end:]
            out.append(Candidate("refusal", "unanswerable", q, refusal, refusal, item.window, first_group + len(out)))
            per[item.window] += 1
            break
    return out


def _doc_names(text: str) -> list[Span]:
    return [s for sent in sentences(text) for s in answer_spans(sent) if s.kind == "name"]
