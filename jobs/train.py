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

Same as ``kale-ray train ...`` (one table of jobs in ``kale_ray/cli.py``).
"""
import sys

from kale_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
