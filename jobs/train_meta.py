"""Ray job: train the DYNAMO meta-model with Ray Train (theta/V sharded across workers).

    ray job submit --working-dir . -- python jobs/train_meta.py --config configs/demo.yaml \
        --set meta.num_workers=4
    python jobs/train_meta.py --recipe smoke            # Ray starts in-process

Flags as ``dynamo-dist meta``: --config / --recipe / --set KEY=VALUE / --address.
Re-running with the same meta.output_dir resumes from that run's latest checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from dynamo_dist.cli import add_common_args, load_pipeline
from dynamo_dist.meta.ray_train import run_meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    args = ap.parse_args(argv)
    try:
        summary = run_meta(load_pipeline(args).meta, address=args.address)
    except (ValueError, FileNotFoundError) as err:
        print(f"train_meta: error: {err}", file=sys.stderr)
        return 2
    print(f"embedded {summary['num_models']} models with {summary['num_workers']} workers: "
          f"agreement {summary.get('mean_agreement', float('nan')):.3f}, "
          f"hidden R2 {summary.get('mean_hidden_r2', float('nan')):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
