"""Convert Debian's r-cran-modeldata `small_fine_foods` (Amazon fine-food reviews, great vs other) to JSONL.

    python bench/fine_foods.py --out data/fine_foods        # downloads the .deb with apt-get (no R needed)
    python bench/fine_foods.py --deb r-cran-modeldata_1.1.0-1_all.deb --out data/fine_foods

Writes OUT/train.jsonl (4000 rows) and OUT/test.jsonl (1000 rows), each row {"text", "label", "product"},
and OUT/SOURCE.md (where the data comes from, its licence). The package's data/Rdata.rdb is R's lazy-load
database: Rdata.rdx (gzip) indexes each object's (offset, length) in Rdata.rdb, whose chunks are a 4-byte
length, a compression byte ('Z': raw LZMA2, '2': bzip2, '1'/else zlib) and an R serialization, which the
PyPI `rdata` package parses (the `bench` extra).
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import lzma
import subprocess
import tempfile
import zlib
from pathlib import Path

DATA_DIR = "usr/lib/R/site-library/modeldata/data"
OBJECTS = {"training_data": "train.jsonl", "testing_data": "test.jsonl"}


def unpack_deb(deb: Path | None, work: Path) -> Path:
    """The .deb's files under work/x (apt-get download when `deb` is None); returns the data directory."""
    if deb is None:
        subprocess.run(["apt-get", "download", "r-cran-modeldata"], cwd=work, check=True)
        deb = next(work.glob("r-cran-modeldata_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "x")], check=True)
    return work / "x" / DATA_DIR


def _decompress(chunk: bytes) -> bytes:
    kind = chunk[4:5]
    if kind == b"Z":
        return lzma.decompress(chunk[5:], format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    if kind == b"2":
        return bz2.decompress(chunk[5:])
    return zlib.decompress(chunk[4:])


def read_objects(data_dir: Path, names: list[str]) -> dict:
    import rdata

    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())))
    db = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name in names:
        offset, length = (int(x) for x in index["variables"][name])
        raw = _decompress(db[offset : offset + length])
        out[name] = rdata.conversion.convert(rdata.parser.parse_data(raw))
    return out


def write_jsonl(frame, path: Path) -> int:
    rows = [{"text": str(r.review), "label": str(r.score), "product": str(r.product)} for r in frame.itertuples()]
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/fine_foods"))
    parser.add_argument("--deb", type=Path, default=None, help="r-cran-modeldata .deb (default: apt-get download)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = unpack_deb(args.deb.resolve() if args.deb else None, Path(tmp))
        copyright_file = Path(tmp) / "x/usr/share/doc/r-cran-modeldata/copyright"
        licence = copyright_file.read_text(encoding="utf-8") if copyright_file.exists() else "(copyright file missing)"
        frames = read_objects(data_dir, list(OBJECTS))
    for name, file in OBJECTS.items():
        n = write_jsonl(frames[name], args.out / file)
        counts = frames[name]["score"].value_counts().to_dict()
        print(f"{args.out / file}: {n} rows, labels {counts}")
    (args.out / "SOURCE.md").write_text(
        "small_fine_foods from the Debian package r-cran-modeldata (CRAN modeldata, Max Kuhn), converted by "
        "bench/fine_foods.py. Amazon fine-food reviews (McAuley and Leskovec, 2013) with score 'great' "
        "(5 stars) or 'other'.\n\nThe package's copyright file:\n\n" + licence, encoding="utf-8")


if __name__ == "__main__":
    main()
