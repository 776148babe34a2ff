"""Ray job: train the DYNAMO meta-model with Ray Train (theta/V sharded across workers).

    ray job submit --working-dir . -- python jobs/train_meta.py --config configs/demo.yaml \
        --set meta.num_workers=4
    python jobs/train_meta.py --recipe smoke            # Ray starts in-process

Flags: exactly those of ``dynamo-dist meta``: --config / --recipe / --set KEY=VALUE / --address /
--register-model NAME (register the logged meta-model in the MLflow Model Registry).
Re-running with the same meta.output_dir resumes from that run's latest checkpoint.
"""

import sys

from dynamo_dist.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["meta", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
