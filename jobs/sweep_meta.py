"""Ray job: Ray Tune sweep of the meta-model over lambda, d and the hidden distance.

    ray job submit --working-dir . -- python jobs/sweep_meta.py --config configs/demo.yaml \
        --tracking-uri http://mlflow.internal:5000
    python jobs/sweep_meta.py --recipe demo --set sweep.scheduler=asha   # Ray starts in-process

Flags: exactly those of ``dynamo-dist sweep``: --config / --recipe / --set KEY=VALUE / --address (--tracking-uri
included).
The grid comes from the config's ``sweep`` section (defaults: SweepConfig).
"""

import sys

from dynamo_dist.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
