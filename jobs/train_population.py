"""Ray job: train a population of base models and record their trajectories.

    ray job submit --working-dir . -- python jobs/train_population.py --config configs/population-200.yaml
    python jobs/train_population.py --recipe smoke            # Ray starts in-process

Flags as ``dynamo-dist population``: --config / --recipe / --set KEY=VALUE / --address.
The stage's MLflow run goes to the config's store (``meta.tracking_uri``, default SQLite
under ``meta.output_dir``).
"""

from __future__ import annotations

import argparse
import sys

from dynamo_dist.cli import add_common_args, load_pipeline
from dynamo_dist.pipeline import population_stage


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    args = ap.parse_args(argv)
    try:
        rows = population_stage(load_pipeline(args), address=args.address)
    except (ValueError, FileNotFoundError) as err:
        print(f"train_population: error: {err}", file=sys.stderr)
        return 2
    print(f"{len(rows)} complete models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
