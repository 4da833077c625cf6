"""report.html: one page per run that a person opens to see what the pipeline made.

Written into the run folder (``<root>/<run>/report.html``) after every ``run``: stage timings,
then one section per stage with its metrics and its images (reconstructions, samples per class,
the high-resolution sample...). What a stage shows is its own business: ``Stage.report(outputs)``
returns ``{"metrics": {label: value}, "images": [(caption, uri)]}``; stages without it show their
scalar outputs. Images are linked by paths relative to the run folder, so the folder can be
copied or synced anywhere (an S3 root included) and the page still finds them.
"""

from __future__ import annotations

import html
import logging
from typing import Any

from pipeline.storage import Storage, join

log = logging.getLogger("pipeline")

REPORT = "report.html"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.7em; text-align: left; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0 1.5em 1em 0; vertical-align: top; }
figure img { image-rendering: pixelated; max-width: 100%; border: 1px solid #ccc; }
figcaption { font-size: 0.9em; color: #555; } .muted { color: #888; }
"""


def relative(uri: str, run_uri: str) -> str:
    """``uri`` as a link relative to the run folder (unchanged when it lies outside)."""
    prefix = run_uri.rstrip("/") + "/"
    return uri[len(prefix):] if uri.startswith(prefix) else uri


def fmt(value: Any) -> str:
    """A metric value for a table cell."""
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def default_section(outputs: dict[str, Any]) -> dict[str, Any]:
    """Scalar outputs (numbers, short strings) as metrics; no images."""
    metrics = {k: v for k, v in outputs.items()
               if isinstance(v, int | float) or (isinstance(v, str) and len(v) < 80
                                                 and "/" not in v)}
    return {"metrics": metrics, "images": []}


def _metrics_table(metrics: dict[str, Any]) -> str:
    if not metrics:
        return ""
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td class='num'>{html.escape(fmt(v))}</td></tr>"
        for k, v in metrics.items())
    return f"<table>{rows}</table>"


def _figures(images: list[tuple[str, str]], run_uri: str) -> str:
    out = []
    for caption, uri in images:
        src = html.escape(relative(uri, run_uri), quote=True)
        out.append(f"<figure><a href='{src}'><img src='{src}' alt='{html.escape(caption)}'>"
                   f"</a><figcaption>{html.escape(caption)}</figcaption></figure>")
    return "".join(out)


def render(run: str, run_uri: str, rows: list[dict[str, Any]]) -> str:
    """The page. ``rows``: per stage in DAG order, {"name", "state", "seconds", "finished_at",
    "uri", "section" (None when not finished)}."""
    timing = "".join(
        f"<tr><th>{html.escape(r['name'])}</th><td>{html.escape(r['state'])}</td>"
        f"<td class='num'>{fmt_seconds(r['seconds'])}</td>"
        f"<td>{html.escape(r['finished_at'] or '-')}</td>"
        f"<td><a href='{html.escape(relative(r['uri'], run_uri), quote=True)}'>"
        f"{html.escape(relative(r['uri'], run_uri))}</a></td></tr>" for r in rows)
    total = sum(r["seconds"] or 0.0 for r in rows)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(run)}: report</title><style>{_STYLE}</style></head><body>",
        f"<h1>Run <code>{html.escape(run)}</code></h1>",
        f"<p class='muted'>{html.escape(run_uri)}</p>",
        "<h2>Stage timings</h2><table><tr><th>stage</th><th>state</th><th>took</th>"
        f"<th>finished</th><th>folder</th></tr>{timing}"
        f"<tr><th>total</th><td></td><td class='num'>{fmt_seconds(total)}</td><td></td>"
        "<td></td></tr></table>",
    ]
    for r in rows:
        parts.append(f"<h2>{html.escape(r['name'])}</h2>")
        section = r["section"]
        if section is None:
            parts.append(f"<p class='muted'>{html.escape(r['state'])}: not finished yet.</p>")
            continue
        parts.append(_metrics_table(section.get("metrics", {})))
        parts.append(_figures(section.get("images", []), run_uri))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_report(pipe: Any, cfg: Any, storage: Storage) -> str:
    """Render the run's report from the finished stages' manifests; returns its URI."""
    run_uri = pipe.run_uri(cfg)
    rows = []
    for p in pipe.plan(cfg):
        if p.skipped is not None:  # not part of this run (e.g. no condition maps to encode)
            continue
        manifest = storage.read_manifest(p.uri)
        row = {"name": p.stage.name, "uri": p.uri, "seconds": None, "finished_at": None,
               "section": None, "state": "pending"}
        if manifest is not None:
            outputs = manifest.get("outputs", {})
            try:
                section = (p.stage.report(p.stage.parse_outputs(manifest)) if p.stage.report
                           else default_section(outputs))
            except (KeyError, TypeError, ValueError) as e:  # an older manifest's layout
                log.warning("[report] %s: %s; showing its scalar outputs", p.stage.name, e)
                section = default_section(outputs)
            row.update(state="done", seconds=manifest.get("seconds"),
                       finished_at=manifest.get("finished_at"), section=section)
        elif storage.walk_files(p.uri):
            row["state"] = "partial"
        rows.append(row)
    uri = join(run_uri, REPORT)
    storage.write_text(uri, render(cfg.run, run_uri, rows))
    return uri


__all__ = ["REPORT", "default_section", "render", "write_report"]
