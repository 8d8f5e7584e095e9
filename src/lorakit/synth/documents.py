"""Documents in, token windows out: what `lorakit synth qa` shows the teacher, one window per call.

Each document becomes plain text (.txt, .md as they are; .html without tags, scripts or styles;
.pdf through pypdf, page by page; .jsonl one document per row's text column). The text is cut
into units at paragraph breaks, and a paragraph longer than a window at sentence ends (then at
words); units are packed into windows of at most `window_tokens`, and each new window starts
with the last units of the one before, up to `overlap_tokens`, so a fact at a boundary is seen
whole at least once. A window keeps its file and the character span it covers in that file's
text, so every generated row can point back at the text it came from.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from lorakit.errors import DataError

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".jsonl")
_PARAGRAPH = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_WORD = re.compile(r"\S+")


@dataclass
class Document:
    file: str
    """The file, as given (a .jsonl row adds `#row N`)."""
    text: str


@dataclass
class Window:
    index: int
    """Position in the whole run (0, 1, ... over every document, in order)."""
    file: str
    start: int
    end: int
    """The character span [start, end) of the document's text."""
    text: str

    @property
    def source(self) -> dict:
        return {"file": self.file, "span": [self.start, self.end]}


def approx_tokens(text: str) -> int:
    """Tokens of a BPE tokenizer, estimated as 1.3 per word (when the teacher is an endpoint)."""
    return -(-len(_WORD.findall(text)) * 13 // 10)


def find_documents(paths: Iterable[str | Path], out: Path | None = None) -> tuple[list[Path], list[Path]]:
    """The files to read (a folder is walked, sorted) and the files of unknown types skipped in folders.

    A file named directly must exist and be of a known type. Files under `out` (synth qa's own output
    folder, when it lies inside a documents folder) are never read as documents.
    """
    skip = out.resolve() if out is not None else None
    files: list[Path] = []
    skipped: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                if any(part.startswith(".") for part in f.relative_to(path).parts):
                    continue
                if skip is not None and f.resolve().is_relative_to(skip):
                    continue
                (files if f.suffix.lower() in SUFFIXES else skipped).append(f)
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise DataError(f"{path}: unknown document type {path.suffix or '(no extension)'!r}; give "
                                f"{', '.join(SUFFIXES)} files (or a folder holding them)")
            files.append(path)
        else:
            raise DataError(f"{path} does not exist; give document files or folders")
    if not files:
        raise DataError(f"no documents ({', '.join(SUFFIXES)}) in {', '.join(str(p) for p in paths)}")
    return files, skipped


def read_documents(files: Iterable[Path], text_column: str = "text") -> list[Document]:
    """Every document's text; an empty or unreadable one is a DataError naming the file and the fix."""
    docs: list[Document] = []
    for path in files:
        suffix = path.suffix.lower()
        try:
            if suffix == ".pdf":
                docs.append(Document(str(path), _pdf_text(path)))
            elif suffix == ".jsonl":
                docs += _jsonl_docs(path, text_column)
            else:
                raw = path.read_text(encoding="utf-8")
                docs.append(Document(str(path), _html_text(raw) if suffix in (".html", ".htm") else raw))
        except UnicodeDecodeError as err:
            raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
        except OSError as err:
            raise DataError(f"cannot read {path}: {err.strerror or err}; check the file and its permissions") from None
    for doc in docs:
        if not doc.text.strip():
            why = "has no text layer (a scanned PDF?); run OCR on it first" if doc.file.lower().endswith(".pdf") \
                else "is empty; remove it or fill it in"
            raise DataError(f"{doc.file} {why}")
    return docs


def _pdf_text(path: Path) -> str:
    try:
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError
    except ImportError:
        raise DataError(f"{path}: reading PDF needs pypdf; pip install 'lorakit[synth]'") from None
    try:
        pages = [page.extract_text() or "" for page in PdfReader(path).pages]
    except (PdfReadError, ValueError, KeyError) as err:
        raise DataError(f"{path} is not a readable PDF ({err}); check the file") from None
    return "\n\n".join(p.strip() for p in pages if p.strip())


def _jsonl_docs(path: Path, column: str) -> list[Document]:
    docs = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {i} is not JSON ({err.msg}); fix the line") from None
        text = row.get(column) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise DataError(f"{path} line {i} has no text column {column!r}; set synth.text_column to the column "
                            "holding the document")
        docs.append(Document(f"{path}#row {i}", text))
    if not docs:
        raise DataError(f"{path} is empty; remove it or fill it in")
    return docs


class _TextOnly(HTMLParser):
    """The visible text of an HTML page: no tags, scripts or styles; block elements end paragraphs."""

    BLOCKS = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table", "section",
              "article", "header", "footer", "pre", "blockquote", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in ("script", "style", "noscript", "template"):
            self._skip += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "noscript", "template"):
            self._skip = max(0, self._skip - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def _html_text(raw: str) -> str:
    parser = _TextOnly()
    parser.feed(raw)
    parser.close()
    paragraphs = (" ".join(p.split()) for p in _PARAGRAPH.split("".join(parser.parts)))
    return "\n\n".join(p for p in paragraphs if p)


def _units(text: str, limit: int, count: Callable[[str], int]) -> list[tuple[int, int]]:
    """Character spans of paragraphs; a paragraph over `limit` tokens is cut at sentence ends, then at words."""
    spans: list[tuple[int, int]] = []
    start = 0
    for m in [*_PARAGRAPH.finditer(text), None]:
        end = m.start() if m else len(text)
        if text[start:end].strip():
            spans += _split(text, start, end, limit, count)
        start = m.end() if m else len(text)
    return spans


def _split(text: str, start: int, end: int, limit: int, count: Callable[[str], int]) -> list[tuple[int, int]]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    if count(text[start:end]) <= limit:
        return [(start, end)]
    cuts = [m.end() for m in _SENTENCE_END.finditer(text, start, end) if start < m.start() and m.end() < end]
    if cuts:
        pieces = list(zip([start, *cuts], [*cuts, end]))
        return [s for a, b in pieces for s in _split(text, a, b, limit, count)]
    words = [(m.start(), m.end()) for m in _WORD.finditer(text, start, end)]
    out, first = [], 0
    while first < len(words):  # the longest run of words that fits, at least one
        last = first + 1
        while last < len(words) and count(text[words[first][0]:words[last][1]]) <= limit:
            last += 1
        out.append((words[first][0], words[last - 1][1]))
        first = last
    return out


def windows(docs: Iterable[Document], window_tokens: int, overlap_tokens: int,
            count: Callable[[str], int] = approx_tokens) -> list[Window]:
    """Each document cut into windows of at most `window_tokens` (by `count`), overlapping by up to `overlap_tokens`."""
    out: list[Window] = []
    for doc in docs:
        units = _units(doc.text, window_tokens, count)
        sizes = [count(doc.text[a:b]) for a, b in units]
        first = 0
        while first < len(units):
            last = first
            while last + 1 < len(units) and count(doc.text[units[first][0]:units[last + 1][1]]) <= window_tokens:
                last += 1
            start, end = units[first][0], units[last][1]
            out.append(Window(len(out), doc.file, start, end, doc.text[start:end]))
            if last + 1 >= len(units):
                break
            nxt, kept = last + 1, 0  # the next window repeats the last units that fit in the overlap
            while nxt - 1 > first and kept + sizes[nxt - 1] <= overlap_tokens:
                nxt -= 1
                kept += sizes[nxt]
            first = nxt
    return out
