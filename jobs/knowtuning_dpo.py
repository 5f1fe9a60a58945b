"""KnowTuning Stage II: knowledge-comparison pairs (delete / revise / shuffle facts) and DPO on Ray Train + DeepSpeed.

Local (starts Ray on this machine)::

    python jobs/knowtuning_dpo.py --config configs/knowtuning_dpo.yaml
    python jobs/knowtuning_dpo.py --config configs/knowtuning_dpo.yaml pairs.num_questions=20 train.max_steps=5

On a cluster (``out`` must be on storage every node sees)::

    ray job submit --working-dir . -- python jobs/knowtuning_dpo.py --config configs/knowtuning_dpo.yaml \\
        train.num_workers=8 train.use_gpu=true out=/mnt/shared/runs/knowtuning_dpo

Overrides are ``key.sub=value`` (``train.dpo.loss_type=ipo``, ``train.dpo.reference=adapter_disabled``).
Writes ``out/{pairs.jsonl, pair_rejects.jsonl, data/, train/, summary.json}``.
"""
from __future__ import annotations

import json
import sys

from _common import parse_job_args

from kale_ray.knowtuning.config import KnowTuningDPOJobConfig


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_job_args(KnowTuningDPOJobConfig, __doc__, argv)
    from kale_ray.knowtuning.recipe import run_dpo_stage

    summary = run_dpo_stage(cfg)
    print(json.dumps({k: summary.get(k) for k in ("pairs", "train", "rewards_after", "seconds")}, indent=2,
                     default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
