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
"""
from __future__ import annotations

import json
import sys

from _common import connect_ray, parse_job_args

from kale_ray.config import SynthConfig


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_job_args(SynthConfig, __doc__, argv)
    print(f"[job] synthesize -> {cfg.out_dir} ({connect_ray()})", flush=True)
    from kale_ray.synth.pipeline import run_synthesis

    summary = run_synthesis(cfg)
    keys = ("rows_in", "rows_out", "rejected", "teacher_rejected", "teacher_counts", "shards_total", "shards_skipped")
    print(json.dumps({**{k: getattr(summary, k) for k in keys}, "seconds": round(summary.seconds["total"], 1),
                      "out_dir": cfg.out_dir}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
