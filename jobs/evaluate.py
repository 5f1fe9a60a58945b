"""Held-out QA evaluation through vLLM (Ray Data): accuracy, hop-probe accuracy, known-and-incorrect rate.

Writes ``predictions.jsonl`` and ``metrics.json`` under ``out_dir``.

Local (starts Ray on this machine)::

    python jobs/evaluate.py --config configs/eval.yaml model.name=runs/demo/kale/merged \\
        data=runs/demo/synth/qa/test.jsonl out_dir=runs/eval_kale

On a cluster (token auth on, see deploy/README.md; model, data and ``out_dir`` on shared storage)::

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"KALE_RAY_CACHE": "/mnt/shared/cache/kale_ray", "TOKENIZERS_PARALLELISM": "false"}}' \\
        -- python jobs/evaluate.py --config configs/eval.yaml model.name=/mnt/shared/runs/kale/kale/merged \\
        data=/mnt/shared/runs/kale/synth/qa/test.jsonl out_dir=/mnt/shared/runs/eval_kale \\
        generation.num_gpus_per_replica=1 generation.concurrency=1 generation.max_concurrency=4

Same as ``kale-ray evaluate ...`` (one table of jobs in ``kale_ray/cli.py``).
"""
import sys

from kale_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
