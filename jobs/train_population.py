"""Ray job: train a population of base models and record their trajectories.

    ray job submit --working-dir . -- python jobs/train_population.py --config configs/population-200.yaml
    python jobs/train_population.py --recipe smoke            # Ray starts in-process

Flags as ``dynamo-dist population``: --config / --recipe / --set KEY=VALUE / --address.
"""

from __future__ import annotations

import argparse
import sys

from dynamo_dist.cli import load_pipeline
from dynamo_dist.population_ray import run_population


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="pipeline YAML config (see configs/)")
    ap.add_argument("--recipe", help="built-in recipe: demo | smoke | paper (default demo)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a dotted field, e.g. population.num_actors=2")
    ap.add_argument("--address", help="Ray cluster address (default $RAY_ADDRESS, else in-process Ray)")
    args = ap.parse_args(argv)
    try:
        rows = run_population(load_pipeline(args).population, address=args.address)
    except (ValueError, FileNotFoundError) as err:
        print(f"train_population: error: {err}", file=sys.stderr)
        return 2
    print(f"{len(rows)} complete models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
