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
"""
from __future__ import annotations

import json
import sys

from _common import connect_ray, parse_job_args

from kale_ray.config import EvalConfig


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_job_args(EvalConfig, __doc__, argv)
    print(f"[job] evaluate {cfg.model.name} on {cfg.data} -> {cfg.out_dir} ({connect_ray()})", flush=True)
    from kale_ray.eval.evaluate import evaluate

    metrics = evaluate(cfg, label=cfg.model.name)
    keys = ("accuracy", "accuracy_ci95", "probe_accuracy", "known_and_incorrect_rate", "n_questions")
    print(json.dumps({k: metrics.get(k) for k in keys} | {"out_dir": cfg.out_dir}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
