"""A canned teacher for the answer-first strategy, served by tests/synth/openai_server.py (the Gull Point document
of qa_fixtures.py). Each reply is chosen for a reason the tests count: a good question, one that fails its round
trip, one that holds its answer, one copied from the prompt's examples, a reply that is no question."""

from __future__ import annotations

import re

QUESTIONS = {  # (sentence start, answer) -> the reply
    ("The Gull", "Gull Point"): "Which lighthouse did Mara Quill build in 1887?",
    ("The Gull", "1887"): "In which year was the lighthouse built?",
    ("The Gull", "Mara Quill"): "Question: Who built the Gull Point lighthouse?\nAnswer: Mara Quill",
    ("The Gull", "19 nautical miles"): "How far away can the lamp be seen?",
    ("The museum", "10 o'clock"): "When does the museum open at 10 o'clock?",  # holds its answer
    ("Visitors", "Gull Point"): "Where do visitors go on the coastal bus?",
    ("Visitors", "42"): "Which library opens at 9 am?",  # the prompt's example
    ("Visitors", "Harwick"): "Sure! I can help with that.",  # no question
}
BLANKED = {  # the second try for the pairs the first lost, the answer blanked out: the blanked sentence's start -> reply
    "The Gull Point lighthouse was built in ___": "When was the Gull Point lighthouse built?",
    "The museum opens at ___": "What time does the museum open every morning?",
    "Visitors reach Gull Point by the coastal bus, route ___": "",  # no question
    "Visitors reach Gull Point by the coastal bus, route 42, which leaves ___": "Where does the coastal bus leave from?",
    # asked only with synth.second_question always (the pairs whose first question was kept):
    "The ___ lighthouse": "Which lighthouse was built in 1887?",
    "The Gull Point lighthouse was built in 1887 by the engineer ___": "Which engineer built the Gull Point lighthouse?",
    "The Gull Point lighthouse was built in 1887 by the engineer Mara Quill. Its lamp can be seen from ___":
        "From how far can the lamp be seen?",
    "Visitors reach ___ by": "Where does the coastal bus take visitors?",
}
ANSWERS = {
    "Which lighthouse did Mara Quill build in 1887?": "The Gull Point lighthouse",
    "In which year was the lighthouse built?": "A long time ago.",  # fails the round trip
    "Who built the Gull Point lighthouse?": "the engineer Mara Quill",
    "How far away can the lamp be seen?": "19 miles",  # the number alone counts
    "Where do visitors go on the coastal bus?": "Gull Point",
    "What lighthouse was built by Mara Quill in 1887?": "Gull Point",
    "Which engineer built the Gull Point lighthouse?": "Mara Quill",
    "Who was the builder of the lighthouse at Gull Point?": "I don't know.",  # fails the round trip
    "From how far can the lamp be seen?": "from 19 nautical miles away",
    "Where does the coastal bus take visitors?": "to Gull Point",
    "When was the Gull Point lighthouse built?": "It was built in 1887.",
    "What time does the museum open every morning?": "At 10 o'clock.",
    "Where does the coastal bus leave from?": "From the square.",  # fails the round trip
    "In what year was the Gull Point lighthouse built?": "1887",
    "At what hour does the museum open?": "10 o'clock",
    "Which lighthouse was built in 1887?": "The Gull Point lighthouse.",
}
REWORDINGS = {  # (question, which prompt) -> the reply
    ("Which lighthouse did Mara Quill build in 1887?", 0): "What lighthouse was built by Mara Quill in 1887?",
    ("Which lighthouse did Mara Quill build in 1887?", 1): "Which lighthouse did Mara Quill build in 1887?",  # a duplicate
    ("Who built the Gull Point lighthouse?", 0): "Which engineer built the Gull Point lighthouse?",
    ("Who built the Gull Point lighthouse?", 1): "Who was the builder of the lighthouse at Gull Point?",
    ("How far away can the lamp be seen?", 0): "From how far can the lamp be seen?",
    ("How far away can the lamp be seen?", 1): "",  # no question
    ("Where do visitors go on the coastal bus?", 0): "Where does the coastal bus take visitors?",
    ("Where do visitors go on the coastal bus?", 1): "Is it Gull Point?",  # holds its answer
    ("When was the Gull Point lighthouse built?", 0): "In what year was the Gull Point lighthouse built?",
    ("When was the Gull Point lighthouse built?", 1): "When was the Gull Point lighthouse built?",  # a duplicate
    ("What time does the museum open every morning?", 0): "At what hour does the museum open?",
    ("What time does the museum open every morning?", 1): "Sure.",  # no question
}


def respond(prompt: str) -> str:
    if m := re.match(r'Text: (.*)\nAnswer: (.*)\nWrite one question', prompt):
        return next(q for (start, a), q in QUESTIONS.items() if m.group(1).startswith(start) and a == m.group(2))
    if m := re.match(r"Text: (.*___.*)\nWrite the question whose answer goes in the blank", prompt):
        return next(q for start, q in sorted(BLANKED.items(), key=lambda kv: -len(kv[0])) if m.group(1).startswith(start))
    if m := re.match(r"Text: .*\nQuestion: (.*)\nAnswer with a few words", prompt):
        return ANSWERS[m.group(1)]
    if m := re.match(r"(Reword this question|Ask this question in other words): (.*)$", prompt):
        return REWORDINGS[(m.group(2), 0 if m.group(1).startswith("Reword") else 1)]
    raise AssertionError(f"an unexpected prompt: {prompt!r}")
