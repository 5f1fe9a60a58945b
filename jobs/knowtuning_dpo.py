"""KnowTuning Stage II: knowledge-comparison pairs (delete / revise / shuffle facts) and DPO on Ray Train + DeepSpeed.

Local (starts Ray on this machine)::

    python jobs/knowtuning_dpo.py --config configs/knowtuning_dpo.yaml
    python jobs/knowtuning_dpo.py --config configs/knowtuning_dpo.yaml pairs.num_questions=20 train.max_steps=5

On a cluster (``out`` must be on storage every node sees)::

    ray job submit --working-dir . -- python jobs/knowtuning_dpo.py --config configs/knowtuning_dpo.yaml \\
        train.num_workers=8 train.use_gpu=true out=/mnt/shared/runs/knowtuning_dpo

Overrides are ``key.sub=value`` (``train.dpo.loss_type=ipo``, ``train.dpo.reference=adapter_disabled``).
Writes ``out/{pairs.jsonl, pair_rejects.jsonl, data/, train/, summary.json}``.

Same as ``kale-ray knowtuning-dpo ...`` (one table of jobs in ``kale_ray/cli.py``).
"""
import sys

from kale_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["knowtuning-dpo", *sys.argv[1:]]))
