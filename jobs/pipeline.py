"""Ray job entry point for the whole pipeline: population -> meta -> (sweep) -> analyze.

    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/demo.yaml
    python jobs/pipeline.py --recipe smoke            # locally, in-process Ray

Flags: exactly those of ``dynamo-dist run`` (--register-model NAME included). The MLflow run
``pipeline`` holds every stage's run.
"""

import sys

from dynamo_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
