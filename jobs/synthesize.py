"""KI synthesis: questions -> entity linking -> KI path search -> teacher rationale -> verified shards.

Path search runs as Ray Data CPU tasks spread over the CPU nodes; the vLLM teacher is an
autoscaling actor pool (``generation.concurrency`` .. ``generation.max_concurrency`` replicas).
Output under ``out_dir``: ``data/shard-*.jsonl`` (+ ``.done`` markers), ``rejects/`` (every row
set aside, with its reason), ``qa/{train,test}.jsonl``, ``summary.json``. Rerunning the same
command skips finished shards.

Local (starts Ray on this machine)::

    python jobs/synthesize.py --config configs/synth_umls.yaml out_dir=runs/synth
    python jobs/synthesize.py generation.backend=template qa.num_questions=40 out_dir=runs/synth_tpl

On a cluster (token auth on: the client reads ``~/.ray/auth_token``, see deploy/README.md;
``out_dir`` and ``KALE_RAY_CACHE`` on storage every node sees)::

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"KALE_RAY_CACHE": "/mnt/shared/cache/kale_ray", "TOKENIZERS_PARALLELISM": "false"}}' \\
        -- python jobs/synthesize.py --config configs/synth_umls.yaml out_dir=/mnt/shared/runs/synth \\
        generation.num_gpus_per_replica=1 generation.concurrency=1 generation.max_concurrency=8

Overrides are ``key.sub=value``; an unknown or mistyped key exits with status 2 and names it.

Same as ``kale-ray synthesize ...`` (one table of jobs in ``kale_ray/cli.py``).
"""
import sys

from kale_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["synthesize", *sys.argv[1:]]))
