"""A small document and a canned but realistic teacher for the `synth qa` tests."""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.synth.pairs import RETRY_NOTE

DOC = """# Gull Point

The Gull Point lighthouse was built in 1887 by the engineer Mara Quill. Its lamp can be seen from 19 nautical miles away.

The keeper's cottage stands beside the lighthouse and now houses a small museum. The museum opens at 10 o'clock every morning from April to September.

Visitors reach Gull Point by the coastal bus, route 42, which leaves Harwick station every hour.
"""
# window_tokens that put each paragraph in a window of its own
SETTINGS = ["synth.window_tokens=40", "synth.overlap_tokens=0", "synth.heldout_fraction=1.0",
            "synth.unanswerable_fraction=0.5", "synth.backoff_s=0.01", "synth.concurrency=2"]

FACTS = {
    "Mara Quill": [
        {"question": "Who built the Gull Point lighthouse?", "answer": "The engineer Mara Quill built it in 1887.",
         "fact": "Mara Quill",
         "paraphrases": ["Which engineer was responsible for the lighthouse at Gull Point?",
                         "Name the person who constructed the Gull Point light."],
         "reversed": {"question": "What did Mara Quill build?", "answer": "Mara Quill built the Gull Point lighthouse.",
                      "fact": "Gull Point lighthouse"}},
        {"question": "How far away can the lamp be seen?", "answer": "The lamp can be seen from 19 nautical miles away.",
         "fact": "19 nautical miles", "paraphrases": ["From what distance is the light of the lamp visible?"],
         "reversed": None},
        {"question": "Who designed the lens of the lighthouse?", "answer": "The lens was designed by Augustin Fresnel.",
         "fact": "Augustin Fresnel", "paraphrases": [], "reversed": None},  # not in the text: ungrounded
        {"question": "When was the lighthouse last painted?", "answer": "I can't answer that from the handbook.",
         "fact": "painted", "paraphrases": [], "reversed": None},  # a refusal in a fact row
        {"question": "Why?", "answer": "Because.", "fact": "Because", "paraphrases": [], "reversed": None},  # length
        {"question": "What is the lighthouse?", "answer": "It is a tall white tower on the point."},  # no fact: incomplete
    ],
    "museum": [
        {"question": "What time does the museum open?", "answer": "The museum opens at 10 o'clock.",
         "fact": "10 o'clock", "paraphrases": ["At what hour does the museum open its doors?"], "reversed": None},
        {"question": "What time does the museum open?", "answer": "It opens at 10 o'clock every morning.",
         "fact": "10 o'clock", "paraphrases": [], "reversed": None},  # the same question again: a duplicate
    ],
    "route 42": [
        {"question": "Which bus goes to Gull Point?", "answer": "The coastal bus, route 42, goes to Gull Point.",
         "fact": "route 42", "paraphrases": ["What bus route should visitors take to reach Gull Point?"],
         "reversed": None},
    ],
}
UNANSWERABLE = ["How many steps does the lighthouse tower have?", "What colour is the lighthouse keeper's boat?",
                "Who built the Gull Point lighthouse in 1887?"]  # the last is answered by the text


def window_of(prompt: str) -> str:
    return prompt.split('"""')[1]


def respond(prompt: str) -> str:
    """What a good teacher would write; the bus window's first facts reply is prose (malformed), then JSON."""
    text = window_of(prompt)
    if "NOT answer" in prompt:
        return json.dumps({"questions": UNANSWERABLE if "Mara Quill" in text else []})
    for key, facts in FACTS.items():
        if key in text:
            if key == "route 42" and RETRY_NOTE not in prompt:
                return "Sure! Here are some questions about the bus to Gull Point."
            return "```json\n" + json.dumps({"facts": facts}) + "\n```"
    return json.dumps({"facts": []})


def write_doc(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gull_point.md"
    path.write_text(DOC)
    return path
