"""The whole KALE recipe: synthesis -> SFT and KALE training -> evaluation -> metrics.json, report.md, plot.png.

The same run as ``kale-ray demo``, as a job: every stage writes under ``out``, and a rerun
reuses what is finished (done shards, Ray Train checkpoints, finished evaluations).

Local (starts Ray on this machine; about an hour on 2 CPU cores with configs/demo.yaml)::

    python jobs/kale.py --config configs/demo.yaml out=runs/kale

On a cluster (token auth on, see deploy/README.md; ``out`` and ``KALE_RAY_CACHE`` on storage
every node sees; GPU nodes come up for the vLLM and training stages and go away after)::

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"KALE_RAY_CACHE": "/mnt/shared/cache/kale_ray", "TOKENIZERS_PARALLELISM": "false"}}' \\
        -- python jobs/kale.py --config configs/demo.yaml out=/mnt/shared/runs/kale \\
        synth.generation.num_gpus_per_replica=1 synth.generation.max_concurrency=8 \\
        train.use_gpu=true train.num_workers=8 train.max_failures=2 train.checkpoint_every=50 \\
        eval.generation.num_gpus_per_replica=1 eval.generation.max_concurrency=4

Same as ``kale-ray kale ...`` (one table of jobs in ``kale_ray/cli.py``).
"""
import sys

from kale_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["kale", *sys.argv[1:]]))
