"""Overrides that keep the smoke recipe's analysis stage small in tests that run the whole pipeline.

The smoke recipe's analysis was more than half of a smoke pipeline's wall time (74 of 140 s on the
loaded 2-core machine: semi-supervised theta at 100 iterates 44 s, fixed points 22 s), and the tests
that run the pipeline end to end check where its outputs land, what the console shows or that a
job succeeds, not the analysis' numbers (test_analysis*.py check those). Every section still runs
and writes its figures and tables, on fewer iterates and candidates."""

from __future__ import annotations

SMALL_ANALYSIS = {"analyze.ssl_steps": 5, "analyze.fixed_point_states": 8, "analyze.fixed_point_iters": 20,
                  "analyze.fixed_point_path_steps": 2}


def small_analysis_args() -> list[str]:
    """``SMALL_ANALYSIS`` as the CLI's ``--set key=value`` arguments."""
    return [a for k, v in SMALL_ANALYSIS.items() for a in ("--set", f"{k}={v}")]
