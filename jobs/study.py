"""The ``study`` job: many runs of the other jobs (methods x prompts x seeds), on this machine
or a Ray cluster, resumable, with a report (``study/``).

    python run.py study --config configs/study-embedded-quick.yaml [key=value ...]

Writes ``<output_dir>/<name>/``: ``state.json`` (every run's status and scores), ``runs/`` (one
run folder each), ``results.csv``, ``report.md``, ``plots/`` and ``report.html`` (and
``gpteval3d/`` with ``scoring.export_gpteval3d``). The ``scoring`` settings add the study's own
metrics (ground-truth geometry, diversity over seeds, CLIP, DINOv2 Fréchet distance; see the
``study`` package). Running the same command again continues the study.
"""

from __future__ import annotations

from typing import Any, Dict

from study import StudyConfig, run_study

Config = StudyConfig


def run(cfg) -> Dict[str, Any]:
    summary = run_study(cfg)
    print(f"{summary['done']} of {summary['runs']} runs done, {summary['failed']} failed; "
          f"report in {summary['report_html']}")
    return summary
