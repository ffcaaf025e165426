"""A study's report, written into its folder:

- ``results.csv``: one row per run (method, prompt, seed, status, run folder, the study's elapsed
  time for it, the job process's peak memory, exit code, the first line of its error, each
  metric: the runs' own, then the study's scores (``study.scoring``), with the nearest
  ground-truth variant when geometry is scored);
- ``report.md``: per method and per method x prompt, each metric's mean over seeds with its 95%
  interval (Student's t) and n; the across-run metrics the scoring asks for (diversity over
  seeds per method and prompt, the Fréchet distance of DINOv2 features per method); then the
  failed runs;
- ``plots/``: each metric per method (box and points), and each quality metric against wall time;
- ``report.html``: a static page (no external assets) with the tables, the plots and every run's
  orbit video side by side per prompt, all by relative paths.
"""

from __future__ import annotations

import csv
import html
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple
from urllib.parse import quote

from matplotlib.figure import Figure
from scipy import stats

from .config import StudyConfig
from .launch import RunSpec, RunStatus
from .scoring import AcrossRuns, measures_geometry, scored_metrics
from .state import RunRecord, StudyState

WALL_TIME_METRIC = "wall_s"  # the runs' own training time, preferred over the study's elapsed
VIDEO_NAMES = ("orbit.mp4", "orbit.gif")


@dataclass
class Summary:
    """A metric's values over seeds: mean and 95% t-interval (None for fewer than two)."""

    n: int
    mean: Optional[float]
    low: Optional[float]
    high: Optional[float]

    def text(self) -> str:
        if self.n == 0:
            return "–"
        if self.low is None:
            return f"{self.mean:.4g} (n=1)"
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}] (n={self.n})"


def summarize(values: Sequence[float]) -> Summary:
    """Mean and the 95% confidence interval of the mean under Student's t."""
    n = len(values)
    if n == 0:
        return Summary(0, None, None, None)
    mean = statistics.fmean(values)
    if n == 1:
        return Summary(1, mean, None, None)
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return Summary(n, mean, mean - half, mean + half)


@dataclass
class RunRow:
    """One run of the study with its record and metrics (empty unless it finished)."""

    spec: RunSpec
    record: RunRecord
    metrics: Dict[str, object]

    def value(self, metric: str) -> Optional[float]:
        """The metric as a number; None when the run has none (or a non-numeric one)."""
        value = self.metrics.get(metric)
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if is_number and math.isfinite(value) else None

    def wall_time(self) -> float:
        own = self.value(WALL_TIME_METRIC)
        return own if own is not None else self.record.elapsed_s

    def video(self) -> Optional[Path]:
        """The run's orbit video (mp4, else GIF), if it wrote one."""
        if self.record.run_dir is None:
            return None
        found = [Path(self.record.run_dir) / name for name in VIDEO_NAMES
                 if (Path(self.record.run_dir) / name).is_file()]
        return found[0] if found else None


def report_metrics(cfg: StudyConfig) -> List[str]:
    """The metrics the report shows: those the runs report, then the study's scores."""
    return list(dict.fromkeys([*cfg.metrics, *scored_metrics(cfg.scoring)]))


def collect_rows(specs: List[RunSpec], state: StudyState,
                 metrics: Dict[str, Dict[str, object]]) -> List[RunRow]:
    return [RunRow(spec, state.record(spec), metrics.get(spec.key, {})) for spec in specs]


def unique(items) -> list:
    """The items in their first order, without repeats."""
    return list(dict.fromkeys(items))


def group_summaries(rows: List[RunRow], metric_names: List[str], by: Tuple[str, ...]
                    ) -> List[Tuple[Tuple[str, ...], int, int, List[Summary]]]:
    """Per group of rows (by ``method`` and optionally ``prompt``): the group, its finished and
    failed run counts, and each metric's summary over its finished runs."""
    groups: Dict[Tuple[str, ...], List[RunRow]] = {}
    for row in rows:
        groups.setdefault(tuple(getattr(row.spec, name) for name in by), []).append(row)
    table = []
    for group, members in groups.items():
        done = [r for r in members if r.record.status == RunStatus.done.value]
        failed = sum(r.record.status == RunStatus.failed.value for r in members)
        summaries = [summarize([v for v in (r.value(m) for r in done) if v is not None])
                     for m in metric_names]
        table.append((group, len(done), failed, summaries))
    return table


def write_csv(rows: List[RunRow], metric_names: List[str], path: Path,
              with_variant: bool = False) -> None:
    """One row per run; ``with_variant``: also the nearest ground-truth variant's name."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "prompt", "seed", "status", "run_dir", "elapsed_s",
                         "peak_rss_mb", "exit_code", "error", *metric_names,
                         *(["gt_variant"] if with_variant else [])])
        for row in rows:
            error = row.record.error.splitlines()[0] if row.record.error else ""
            peak = row.record.peak_rss_mb
            writer.writerow([row.spec.method, row.spec.prompt, row.spec.seed, row.record.status,
                             row.record.run_dir or "", f"{row.record.elapsed_s:.2f}",
                             "" if peak is None else f"{peak:.1f}",
                             "" if row.record.exit_code is None else row.record.exit_code, error,
                             *["" if row.value(m) is None else row.value(m)
                               for m in metric_names],
                             *([row.metrics.get("gt_variant") or ""] if with_variant else [])])


def markdown_table(header: List[str], body: List[List[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, body)])


def summary_body(table, metric_names) -> List[List[str]]:
    return [[*group, done, failed, *[s.text() for s in summaries]]
            for group, done, failed, summaries in table]


def number(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.4g}"


DIVERSITY_HEADER = ["method", "prompt", "runs", "variants reached", "seed Chamfer"]
DIVERSITY_NOTE = ("Diversity over seeds: how many of the prompt's ground-truth variants the runs "
                  "are nearest to, and the mean Chamfer distance between two seeds' surfaces "
                  "(world frame).")
FRECHET_HEADER = ["method", "runs", "renders", "reference renders", "Fréchet distance"]
FRECHET_NOTE = ("Fréchet distance between Gaussians fitted to the DINOv2 CLS features of the "
                "method's renders and of the reference (the ground truth of every study prompt "
                "rendered on the same orbit); lower is closer.")


def diversity_body(across: AcrossRuns) -> List[List[str]]:
    return [[r.method, r.prompt, r.runs,
             "–" if r.variants is None else f"{r.variants_reached} of {r.variants}",
             number(r.seed_chamfer)] for r in across.diversity]


def frechet_body(across: AcrossRuns) -> List[List[str]]:
    return [[r.method, r.runs, r.renders, r.reference_renders, number(r.frechet_distance)]
            for r in across.frechet]


def write_markdown(cfg: StudyConfig, rows: List[RunRow], across: AcrossRuns,
                   path: Path) -> None:
    metric_names = report_metrics(cfg)
    stat_note = ("Each cell: the mean over seeds, its 95% confidence interval (Student's t) and "
                 "n, the finished runs that reported the metric.")
    parts = [f"# Study {cfg.name}", "", stat_note, "", "## Per method", "",
             markdown_table(["method", "done", "failed", *metric_names],
                            summary_body(group_summaries(rows, metric_names, ("method",)),
                                         metric_names)),
             "", "## Per method and prompt", "",
             markdown_table(["method", "prompt", "done", "failed", *metric_names],
                            summary_body(group_summaries(rows, metric_names,
                                                         ("method", "prompt")), metric_names))]
    if across.diversity:
        parts += ["", "## Diversity over seeds", "", DIVERSITY_NOTE, "",
                  markdown_table(DIVERSITY_HEADER, diversity_body(across))]
    if across.frechet:
        parts += ["", "## Fréchet distance (DINOv2)", "", FRECHET_NOTE, "",
                  markdown_table(FRECHET_HEADER, frechet_body(across))]
    failed = [r for r in rows if r.record.status == RunStatus.failed.value]
    if failed:
        parts += ["", "## Failed runs", "",
                  markdown_table(["run", "exit code", "error"],
                                 [[r.spec.key, r.record.exit_code, (r.record.error or "")
                                   .splitlines()[0]] for r in failed])]
    path.write_text("\n".join(parts) + "\n")


def plot_by_method(rows: List[RunRow], metric: str, path: Path) -> bool:
    """A box per method with each run as a point; False (nothing written) without values."""
    methods = unique(r.spec.method for r in rows)
    values = [[v for v in (r.value(metric) for r in rows if r.spec.method == m) if v is not None]
              for m in methods]
    if not any(values):
        return False
    fig = Figure(figsize=(1.6 + 1.2 * len(methods), 3.6), layout="constrained")
    ax = fig.add_subplot()
    ax.boxplot(values, showfliers=False)
    for i, vals in enumerate(values, start=1):
        offsets = [0.08 * ((k % 5) - 2) for k in range(len(vals))]
        ax.scatter([i + o for o in offsets], vals, s=14, alpha=0.8, zorder=3)
    ax.set_xticks(range(1, len(methods) + 1), methods, rotation=20)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per method")
    fig.savefig(path, dpi=100)
    return True


def plot_against_wall_time(rows: List[RunRow], metric: str, path: Path) -> bool:
    """Each run's metric against its wall time, coloured by method; False without values."""
    fig = Figure(figsize=(5.0, 3.6), layout="constrained")
    ax = fig.add_subplot()
    plotted = False
    for method in unique(r.spec.method for r in rows):
        points = [(r.wall_time(), r.value(metric)) for r in rows
                  if r.spec.method == method and r.value(metric) is not None]
        if points:
            ax.scatter(*zip(*points), label=method, s=18)
            plotted = True
    if not plotted:
        return False
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against wall time")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)
    return True


def write_plots(cfg: StudyConfig, rows: List[RunRow], plot_dir: Path) -> List[Path]:
    """Every plot that has data; their paths."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for metric in report_metrics(cfg):
        path = plot_dir / f"{metric}_by_method.png"
        if plot_by_method(rows, metric, path):
            written.append(path)
    for metric in [m for m in report_metrics(cfg) if m != WALL_TIME_METRIC]:
        path = plot_dir / f"{metric}_vs_wall_time.png"
        if plot_against_wall_time(rows, metric, path):
            written.append(path)
    return written


def relative_url(path: Path, base: Path) -> str:
    return quote(Path(os.path.relpath(path, base)).as_posix())


def html_table(table_id: str, header: List[str], body: List[List[str]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    lines = ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"
             for cells in body]
    return (f'<table id="{table_id}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(lines)}</tbody></table>')


def media_cell(row: RunRow, metric_names: List[str], base: Path) -> str:
    """A run's orbit video (or GIF) with its metrics below, or why it has none."""
    video = row.video()
    if video is None:
        reason = row.record.status if row.record.status != RunStatus.done.value else "no video"
        return f'<div class="missing">{html.escape(reason)}</div>'
    url = relative_url(video, base)
    title = html.escape(row.spec.key)
    media = (f'<img src="{url}" alt="{title}">' if video.suffix == ".gif" else
             f'<video src="{url}" title="{title}" autoplay loop muted playsinline '
             'preload="auto"></video>')
    caption = ", ".join(f"{m} {row.value(m):.4g}" for m in metric_names
                        if row.value(m) is not None)
    return f"{media}<div>{html.escape(caption)}</div>"


def orbit_section(cfg: StudyConfig, rows: List[RunRow], base: Path) -> str:
    """Per prompt, a grid of orbit videos: a row per method, a column per seed."""
    parts = []
    seeds = unique(r.spec.seed for r in rows)
    for prompt in unique(r.spec.prompt for r in rows):
        header = "".join(f"<th>seed {s}</th>" for s in seeds)
        lines = []
        for method in unique(r.spec.method for r in rows):
            cells = "".join(
                f"<td>{media_cell(r, report_metrics(cfg), base)}</td>" for r in rows
                if r.spec.method == method and r.spec.prompt == prompt)
            lines.append(f"<tr><th>{html.escape(method)}</th>{cells}</tr>")
        parts.append(f"<h3>{html.escape(prompt)}</h3><table class=\"orbits\"><thead><tr><th>"
                     f"</th>{header}</tr></thead><tbody>{''.join(lines)}</tbody></table>")
    return "\n".join(parts)


STYLE = """
body { font-family: sans-serif; margin: 1.5em; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
video, .orbits img { width: 160px; height: 160px; display: block; }
.plots img { max-width: 100%; margin: 0 1em 1em 0; }
.missing { width: 160px; color: #a00; }
"""


def across_html(across: AcrossRuns) -> str:
    """The across-run tables, each under its heading (nothing for none)."""
    parts = []
    if across.diversity:
        parts.append(f"<h2>Diversity over seeds</h2><p>{html.escape(DIVERSITY_NOTE)}</p>"
                     + html_table("diversity", DIVERSITY_HEADER, diversity_body(across)))
    if across.frechet:
        parts.append(f"<h2>Fréchet distance (DINOv2)</h2><p>{html.escape(FRECHET_NOTE)}</p>"
                     + html_table("frechet", FRECHET_HEADER, frechet_body(across)))
    return "\n".join(parts)


def write_html(cfg: StudyConfig, rows: List[RunRow], across: AcrossRuns, plots: List[Path],
               study_dir: Path, path: Path) -> None:
    metric_names = report_metrics(cfg)
    by_method = group_summaries(rows, metric_names, ("method",))
    by_prompt = group_summaries(rows, metric_names, ("method", "prompt"))
    plot_tags = "".join(f'<img src="{relative_url(p, study_dir)}" alt="{html.escape(p.stem)}">'
                        for p in plots)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Study {html.escape(cfg.name)}</title>
<link rel="icon" href="data:,">
<style>{STYLE}</style></head><body>
<h1>Study {html.escape(cfg.name)}</h1>
<p>Each cell: the mean over seeds, its 95% confidence interval (Student's t) and n.</p>
<h2>Per method</h2>
{html_table("per-method", ["method", "done", "failed", *metric_names],
            summary_body(by_method, metric_names))}
<h2>Per method and prompt</h2>
{html_table("per-method-prompt", ["method", "prompt", "done", "failed", *metric_names],
            summary_body(by_prompt, metric_names))}
{across_html(across)}
<h2>Plots</h2>
<div class="plots">{plot_tags}</div>
<h2>Orbit videos</h2>
{orbit_section(cfg, rows, study_dir)}
</body></html>
"""
    path.write_text(page)


def write_report(cfg: StudyConfig, specs: List[RunSpec], state: StudyState,
                 metrics: Dict[str, Dict[str, object]], across: AcrossRuns,
                 study_dir: Path) -> Dict[str, Path]:
    """Write every part of the report; their paths by name. ``metrics``: each finished run's
    own metrics and the study's scores, by run key."""
    rows = collect_rows(specs, state, metrics)
    files = {"results_csv": study_dir / "results.csv", "report_md": study_dir / "report.md",
             "report_html": study_dir / "report.html"}
    write_csv(rows, report_metrics(cfg), files["results_csv"], measures_geometry(cfg.scoring))
    write_markdown(cfg, rows, across, files["report_md"])
    plots = write_plots(cfg, rows, study_dir / "plots")
    write_html(cfg, rows, across, plots, study_dir, files["report_html"])
    return files
