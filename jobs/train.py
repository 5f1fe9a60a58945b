"""Fine-tune with Ray Train + DeepSpeed: SFT or KALE (or any loss in kale_ray.train.registry).

Local (starts Ray on this machine; ~2 min for 5 steps of SmolLM2-135M on 2 CPU workers)::

    python jobs/train.py --config configs/train_kale.yaml
    python jobs/train.py --config configs/train_kale.yaml loss=sft out_dir=runs/train_sft
    python jobs/train.py --config configs/train_sft.yaml max_steps=5 zero_stage=3

On a cluster (``out_dir`` must be on storage every node sees)::

    ray job submit --working-dir . -- python jobs/train.py --config configs/train_kale.yaml \\
        num_workers=8 use_gpu=true out_dir=/mnt/shared/runs/train_kale

Overrides are ``key.sub=value`` (``lora.r=8``, ``ka.lam=0.5``). Rerunning the same command
resumes from the last checkpoint in ``out_dir/ray/<run name>``.
"""
from __future__ import annotations

import argparse
import json
import sys

from kale_ray.config import TrainConfig, load_config
from kale_ray.train.trainer import run_training


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file with TrainConfig fields")
    parser.add_argument("--run-name", default=None, help="Ray Train run name (default: 'train'); same name resumes")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args(argv)
    cfg = load_config(TrainConfig, args.config, args.overrides)
    result = run_training(cfg, run_name=args.run_name)
    keys = ("steps", "samples", "final_loss", "first_loss", "seconds_per_step", "samples_per_s",
            "wall_seconds", "rejected")
    print(json.dumps({k: result.summary.get(k) for k in keys}, indent=2))
    print(f"merged model: {result.merged_dir}\nadapter: {result.adapter_dir}\nhistory: {result.out_dir}/history.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
