"""Write the opening chapters of a Jane Austen novel as plain text (the quantization report's text).

The novels come from Debian's `r-cran-janeaustenr` 1.0.0-1 (Julia Silge's R package "Jane
Austen's Complete Novels"; its debian/copyright gives the package MIT; the novels themselves,
published 1811-1818, are in the public domain). No R needed: the package keeps its data as an R lazy-load database
(Rdata.rdx, a gzipped serialized index of offsets, and Rdata.rdb, one zlib-compressed
serialized object per book), which the `rdata` package (`pip install rdata`, in the
`bench` extra) parses.

    cd /tmp && apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb janeaustenr
    python bench/austen_text.py --package /tmp/janeaustenr --book emma --chapters 3 --out bench/results/emma_ch1-3.txt

The book is a vector of printed lines; consecutive lines are joined into paragraphs
(a blank line ends one), and the text runs from the title up to the start of chapter
`--chapters + 1`.
"""

from __future__ import annotations

import argparse
import gzip
import re
import struct
import warnings
import zlib
from pathlib import Path

BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"


def _parse(raw: bytes):
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS": a bare serialization is what we give it
        return rdata.conversion.convert(rdata.parser.parse_data(raw))


def book_lines(package: Path, book: str) -> list[str]:
    """The printed lines of `book` from the extracted Debian package at `package`."""
    data = package / DATA_DIR
    index = _parse(gzip.decompress((data / "Rdata.rdx").read_bytes()))
    offset, length = (int(v) for v in index["variables"][book])
    with open(data / "Rdata.rdb", "rb") as fh:
        fh.seek(offset)
        blob = fh.read(length)
    (size,) = struct.unpack(">I", blob[:4])  # uncompressed size, then the zlib stream
    raw = zlib.decompress(blob[4:])
    assert len(raw) == size, f"{book}: {len(raw)} bytes after decompression, the index says {size}"
    return [str(line) for line in _parse(raw)]


def chapters_text(lines: list[str], chapters: int) -> str:
    """Title up to (not including) the heading of chapter `chapters + 1`, as paragraphs."""
    headings = [i for i, line in enumerate(lines) if re.fullmatch(r"\s*CHAPTER [IVXLC]+\.?\s*", line)]
    end = headings[chapters] if len(headings) > chapters else len(lines)
    paragraphs, current = [], []
    for line in lines[:end]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", type=Path, required=True, help="where r-cran-janeaustenr's .deb was extracted")
    parser.add_argument("--book", choices=BOOKS, default="emma")
    parser.add_argument("--chapters", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    text = chapters_text(book_lines(args.package, args.book), args.chapters)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"{args.out}: {args.book}, chapters 1-{args.chapters}, {len(text.split())} words, {len(text)} characters")


if __name__ == "__main__":
    main()
