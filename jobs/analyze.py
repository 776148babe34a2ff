"""Ray job: analyses of a finished meta run -> plots, tables, report.html, MLflow run "analyze".

    ray job submit --working-dir . -- python jobs/analyze.py --config configs/demo.yaml
    python jobs/analyze.py --recipe smoke --meta-dir runs/smoke/meta

Flags as ``dynamo-dist analyze``: --config / --recipe / --set KEY=VALUE (e.g. analyze.landscape_grid=5)
/ --meta-dir (default: the config's meta.output_dir), plus --out-dir and --no-log.
The analyses run in this process (no Ray workers needed).
"""

from __future__ import annotations

import argparse
import sys

from dynamo_dist.analysis import run_analysis
from dynamo_dist.analysis.report import to_json
from dynamo_dist.cli import load_pipeline


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="pipeline YAML config (see configs/)")
    ap.add_argument("--recipe", help="built-in recipe: demo | smoke | paper (default demo)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a dotted field, e.g. analyze.landscape_grid=5")
    ap.add_argument("--meta-dir", help="meta run directory (default: the config's meta.output_dir)")
    ap.add_argument("--out-dir", help="where the report goes (default: <meta-dir>/analysis)")
    ap.add_argument("--no-log", action="store_true", help="do not log to MLflow")
    args = ap.parse_args(argv)
    try:
        cfg = load_pipeline(args)
        result = run_analysis(args.meta_dir or cfg.meta.output_dir, cfg.analyze, args.out_dir, log=not args.no_log)
    except (ValueError, FileNotFoundError) as err:
        print(f"analyze: error: {err}", file=sys.stderr)
        return 2
    print(to_json({k: v for k, v in result.items() if k not in ("report", "analysis_json")}, indent=1))
    print(f"report: {result['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
