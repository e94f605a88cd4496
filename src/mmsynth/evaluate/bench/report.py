"""Writing a benchmark result: JSON (the schema of results.py), Markdown, and a static HTML report.

The HTML report is one index.html plus images/ (per row, a grid: one line per case, condition | output |
judge overlay) and plots/ (metric vs each swept sampler setting, with 95% intervals), built in a temporary
folder beside its destination and renamed into place; the JSON and Markdown files are written atomically.
Nothing half-written is ever left behind.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np

from mmsynth.evaluate.bench.results import BenchResult, RowResult
from mmsynth.io import atomic_dir, write_json, write_text
from mmsynth.viz import grid, label

TILE = 128  # every report tile is scaled (nearest neighbour) to this height


def markdown_path(json_path: str | Path) -> Path:
    """OUT.json -> OUT.md (the Markdown table beside the JSON)."""
    return Path(json_path).with_suffix(".md")


def cases_path(json_path: str | Path) -> Path:
    """OUT.json -> OUT.cases.jsonl (one line per scored case and row)."""
    p = Path(json_path)
    return p.with_name(p.stem + ".cases.jsonl")


def default_html_dir(json_path: str | Path) -> Path:
    p = Path(json_path)
    return p.with_name(p.stem + "_report")


def _tile(img: np.ndarray, title: str) -> np.ndarray:
    from PIL import Image

    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.shape[0] != TILE:
        w = max(1, round(img.shape[1] * TILE / img.shape[0]))
        img = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((w, TILE), Image.NEAREST))
    return label(img, title, height=14)


def row_grid(row: RowResult) -> np.ndarray | None:
    """One line per drawn case: its tiles left to right."""
    if not row.panels:
        return None
    tiles = [[_tile(img, title) for title, img in p.tiles] for p in row.panels]
    cols = max(len(t) for t in tiles)
    flat = [t for line in tiles for t in (line + [np.full_like(line[0], 255)] * (cols - len(line)))]
    return grid(flat, cols=cols)


def sweep_plots(result: BenchResult, folder: Path) -> list[tuple[str, str]]:
    """Per suite, swept setting and plotted metric (the suite's headline, or its first metric, and its
    sweep_metrics): the metric vs the setting, one line per base row. Returns (file name, caption) pairs."""
    from mmsynth.evaluate.bench.registry import get_suite

    out = []
    sweeps = [r for r in result.rows if r.sweep]
    for suite in result.suites():
        srows = [r for r in sweeps if r.suite == suite]
        if not srows:
            continue
        s = get_suite(suite)
        metrics = [m for m in (s.headline or next(iter(srows[0].metrics), None), *s.sweep_metrics) if m]
        for param in sorted({r.sweep["param"] for r in srows}):  # type: ignore[index]
            for metric in metrics:
                plotted = _sweep_plot(result, suite, param, metric, srows, folder)
                if plotted:
                    out.append(plotted)
    return out


def _sweep_plot(result: BenchResult, suite: str, param: str, metric: str, srows: list[RowResult],
                folder: Path) -> tuple[str, str] | None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    on_param = [r for r in srows if r.sweep and r.sweep["param"] == param and metric in r.metrics]
    if not on_param:
        return None
    fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=100)
    for base in sorted({r.sweep["row"] for r in on_param if r.sweep}):
        mine = [(r.sweep["value"], r.metrics[metric]) for r in on_param if r.sweep and r.sweep["row"] == base]
        plain = [r for r in result.rows if r.suite == suite and r.row == base and metric in r.metrics]
        if plain and param in plain[0].settings:  # the row at its own setting is a point too
            mine.append((float(plain[0].settings[param]), plain[0].metrics[metric]))
        pts = sorted(mine, key=lambda x: x[0])
        xs = [x for x, _ in pts]
        ys = [m.value for _, m in pts]
        err = None
        if all(not math.isnan(m.low) for _, m in pts):
            err = [[m.value - m.low for _, m in pts], [m.high - m.value for _, m in pts]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=base)
    ax.set_xlabel(param)
    ax.set_ylabel(metric)
    ax.set_title(f"{suite}: {metric} vs {param}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = f"{suite}_{metric}_vs_{param}.png"
    fig.savefig(folder / name)
    plt.close(fig)
    return name, f"{suite}: {metric} vs {param} (95% intervals)"


def _html(result: BenchResult, grids: dict[tuple[str, str], str], plots: list[tuple[str, str]]) -> str:
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>mmsynth bench</title><style>",
             "body{font-family:sans-serif;margin:2em;max-width:1200px} table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right} th{background:#eee}"
             "td:first-child{text-align:left} .note{color:#666} img{image-rendering:pixelated}",
             "</style></head><body><h1>mmsynth bench</h1>"]  # fmt: skip
    env = result.environment
    parts.append(f"<p class='note'>device {esc(str(env.get('device')))}, {env.get('world_size', 1)} process(es), "
                 f"sampler {esc(json.dumps(env.get('sampler', {})))}, total {result.wall_s:.1f} s</p>")  # fmt: skip
    for suite in result.suites():
        parts.append(f"<h2>{esc(suite)}</h2>")
        if suite in result.pending:
            parts.append(f"<p class='note'>{esc(result.pending[suite])}</p>")
            continue
        rows = [r for r in result.rows if r.suite == suite]
        names: list[str] = []
        for r in rows:
            names += [k for k in r.metrics if k not in names]
        parts.append("<table><tr><th>row</th><th>kind</th><th>n</th>" + "".join(f"<th>{esc(n)}</th>" for n in names)
                     + "<th>wall s</th></tr>")  # fmt: skip
        for r in rows:
            cells = []
            for n in names:
                m = r.metrics.get(n)
                if m is None or math.isnan(m.value):
                    cells.append("<td>n/a</td>")
                elif math.isnan(m.low):
                    cells.append(f"<td>{m.value:.4f}</td>")
                else:
                    cells.append(f"<td>{m.value:.3f}<br><small>[{m.low:.3f}, {m.high:.3f}]</small></td>")
            parts.append(f"<tr><td>{esc(r.row)}</td><td>{r.kind}</td><td>{r.n_cases}</td>{''.join(cells)}"
                         f"<td>{r.wall_s:.1f}</td></tr>")  # fmt: skip
        parts.append("</table>")
        for r in rows:
            for k, v in r.unavailable.items():
                parts.append(f"<p class='note'>{esc(r.row)}: <code>{esc(k)}</code> unavailable: {esc(v)}</p>")
            if r.skipped:
                parts.append(f"<p class='note'>{esc(r.row)}: {len(r.skipped)} case(s) skipped, e.g. "
                             f"{esc(r.skipped[0]['case'])}: {esc(r.skipped[0]['reason'])}</p>")  # fmt: skip
        parts += [f"<p>{esc(note)}</p>" for note in result.notes.get(suite, [])]
        for r in rows:
            src = grids.get((suite, r.row))
            if src:
                captions = "".join(f"<li><code>{esc(p.case_id)}</code> {esc(p.caption)}</li>" for p in r.panels)
                parts.append(f"<h3>{esc(r.row)}</h3><p class='note'>{esc(r.description)}</p>"
                             f"<img src='{esc(src)}' alt='{esc(r.row)}'><ol>{captions}</ol>")  # fmt: skip
    if plots:
        parts.append("<h2>sweeps</h2>")
        parts += [f"<figure><img src='plots/{esc(n)}'><figcaption>{esc(c)}</figcaption></figure>" for n, c in plots]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_html(result: BenchResult, folder: str | Path, overwrite: bool = False) -> Path:
    """Build the report in a temp folder beside `folder`, then move it into place (with `overwrite`, replacing the
    report's own files in a non-empty folder and nothing else)."""
    from PIL import Image

    dest = Path(folder)
    with atomic_dir(dest, overwrite=overwrite) as tmp:
        (tmp / "images").mkdir()
        (tmp / "plots").mkdir()
        grids = {}
        for r in result.rows:
            g = row_grid(r)
            if g is not None:
                name = "images/" + "".join(ch if ch.isalnum() else "_" for ch in f"{r.suite}_{r.row}") + ".png"
                Image.fromarray(g).save(tmp / name)
                grids[(r.suite, r.row)] = name
        plots = sweep_plots(result, tmp / "plots")
        (tmp / "index.html").write_text(_html(result, grids, plots), encoding="utf-8")
    return dest


def write_report(result: BenchResult, json_path: str | Path, html_dir: str | Path | None = None,
                 overwrite: bool = False) -> list[Path]:
    """JSON, Markdown beside it, and (optionally) the HTML folder; returns what was written."""
    written = []
    if html_dir is not None:
        written.append(write_html(result, html_dir, overwrite))
    md = markdown_path(json_path)
    write_text(result.markdown(), md)
    records = [json.dumps({"suite": r.suite, "row": r.row, **c}) + "\n" for r in result.rows for c in r.cases]
    if records:
        write_text("".join(records), cases_path(json_path))
        written.append(cases_path(json_path))
    else:
        cases_path(json_path).unlink(missing_ok=True)  # not an earlier run's records beside this run's JSON
    write_json(result.to_dict(), json_path)  # last: its presence means the whole report is there
    return [*written, md, Path(json_path)]


def check_report_outputs(json_path: str | Path, overwrite: bool = False, what: str = "--json") -> Path:
    """Check, before any work, every file a report with an HTML folder writes (OUT.json, OUT.md, OUT.cases.jsonl,
    OUT_report/): a command that runs the bench for its own purpose refuses to replace them before it starts."""
    from mmsynth.io import check_output_dir, check_output_file

    out = check_output_file(json_path, what, suffixes=(".json",), overwrite=overwrite)
    for path in (markdown_path(out), cases_path(out)):
        check_output_file(path, f"{what} '{out}' (its report file)", overwrite=overwrite)
    check_output_dir(default_html_dir(out), f"{what} '{out}' (its HTML report folder)", overwrite=overwrite)
    return out
