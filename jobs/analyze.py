"""Ray job: analyses of a finished meta run -> plots, tables, report.html, MLflow run "analyze".

    ray job submit --working-dir . -- python jobs/analyze.py --config configs/demo.yaml
    python jobs/analyze.py --recipe smoke --meta-dir runs/smoke/meta

Flags: exactly those of ``dynamo-dist analyze``: --config / --recipe / --set KEY=VALUE (e.g. analyze.landscape_grid=5)
/ --meta-dir / --out-dir / --no-log.
The analyses run in this process (no Ray workers needed).
"""

import sys

from dynamo_dist.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["analyze", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
