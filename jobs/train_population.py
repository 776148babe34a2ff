"""Ray job: train a population of base models and record their trajectories.

    ray job submit --working-dir . -- python jobs/train_population.py --config configs/population-200.yaml
    python jobs/train_population.py --recipe smoke            # Ray starts in-process

Flags: exactly those of ``dynamo-dist population``: --config / --recipe / --set KEY=VALUE / --address.
The stage's MLflow run goes to the pipeline's store (``tracking.tracking_uri``, default SQLite
``<run_dir>/mlflow.db``, shared by every stage).
"""

import sys

from dynamo_dist.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["population", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
