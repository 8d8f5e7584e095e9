"""quant_report.html: the quantization report as one offline page (like the run report).

CSS inline, plots as data: PNGs, no scripts, no fonts or URLs; a Content-Security-Policy
forbids any load besides data: images. Every string from the report is HTML-escaped.
"""

from __future__ import annotations

import html
from typing import Any

from lorakit.eval.plots import labelled_points
from lorakit.eval.report import CSS, fmt

FOUR_BIT_MAX = 6.0  # bits per parameter below which a setting is in the zoomed plot


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def plots(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(caption, data URI): perplexity against the linear weights' bits per parameter, all and 4-bit only."""
    ok = [r for r in rows if "error" not in r]
    every = [(r["setting"], r["linear_bits"], r["perplexity"]) for r in ok]
    four = [p for p in every if p[1] < FOUR_BIT_MAX]
    few_labels = [("" if p[1] < FOUR_BIT_MAX and len(four) > 1 else p[0], p[1], p[2]) for p in every]
    levels = [(f"{r['setting']} {r['perplexity']:.2f}", r["perplexity"]) for r in ok if r["linear_bits"] >= 16]
    out = []
    for title, points, logx, lines in (("Perplexity against bits per parameter (4-bit labels: next plot)", few_labels,
                                        True, []),
                                       ("The 4-bit settings (dashed: 16- and 32-bit)", four, False, levels)):
        uri = labelled_points(title, "bits per parameter of the linear weights", "perplexity", points, logx=logx,
                              hlines=lines)
        if uri is not None and points:
            out.append((title, uri))
    return out


def _pct(value: Any, signed: bool = False) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    return f"{100 * value:+.2f}%" if signed else f"{100 * value:.2f}%"


def _rows_table(rows: list[dict[str, Any]]) -> str:
    head = ["setting", "bits/param linear", "bits/param model", "stored MiB", "load peak RSS MiB", "perplexity",
            "vs fp32", "top-1 agreement", "forward tokens/s", "generation tokens/s"]
    body = []
    for r in rows:
        if "error" in r:
            body.append([_e(r["setting"]), f'<span class="none">error: {_e(r["error"])}</span>'] + [""] * 8)
            continue
        stored = (r["linear_bytes"] + r["other_bytes"]) / 2**20
        cells = [r["setting"], f"{r['linear_bits']:.3f}", f"{r['model_bits']:.3f}", f"{stored:.1f}",
                 f"{r['load_peak_rss_mb']:.0f}", fmt(r["perplexity"], 5), _pct(r.get("perplexity_vs_fp32"), True),
                 _pct(r.get("top1_agreement")), f"{r['score_tokens_per_s']:.1f}", f"{r['gen_tokens_per_s']:.1f}"]
        body.append([_e(c) for c in cells])
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    return f"<table><thead><tr>{th}</tr></thead><tbody>" + "".join(
        "<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in body) + "</tbody></table>"


def render_html(report: dict[str, Any]) -> str:
    figures = "".join(f'<figure><img alt="{_e(t)}" src="{uri}"><figcaption>{_e(t)}</figcaption></figure>'
                      for t, uri in plots(report["rows"]))
    about = (f"{report['windows']} non-overlapping windows of {report['max_length']} tokens "
             f"({report['scored_tokens']:,} scored tokens) from {report['text']} "
             f"({report['text_tokens']:,} tokens, sha256 {report['text_sha256'][:12]}); greedy generation of "
             f"{report['gen_tokens']} tokens; {report['threads']} thread(s); "
             f"{report.get('repeats', 1)} round(s) over the settings (timings and RSS: medians); torch {report['torch']}. "
             "Quantized settings: linear layers quantized (not the output head), everything else and the "
             "matmuls in bf16. Top-1 agreement: share of positions whose most likely next token equals fp32's. "
             "Forward tokens/s: scoring the windows; generation tokens/s: greedy decoding with the KV cache.")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
        "style-src 'unsafe-inline'\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>lorakit quantization report: {_e(report['model'])}</title>\n<style>{CSS}</style></head>\n<body>\n"
        f"<h1>Quantization report: {_e(report['model'])}</h1>\n<p>{_e(about)}</p>\n"
        f'<section><h2>Perplexity against bits</h2>\n<div class="plots">{figures}</div></section>\n'
        f"<section><h2>Every setting</h2>\n{_rows_table(report['rows'])}</section>\n"
        f"<footer>Written by lorakit {_e(report['lorakit'])} on {_e(report['created'])}.</footer>\n</body></html>\n"
    )
