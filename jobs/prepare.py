"""Render the kept synthesised rows into a student's training rows: JSONL under ``out/`` (prompt, teacher_prompt,
completion in the student's chat template), the ``data`` of ``jobs/train.py``. No Ray, no GPU.

Local, between ``jobs/synthesize.py`` and ``jobs/train.py``::

    python jobs/synthesize.py --config configs/synth_umls.yaml out_dir=runs/synth
    python jobs/prepare.py synth=runs/synth out=runs/rows model=builtin:smollm2-135m
    python jobs/train.py --config configs/train_kale.yaml data=runs/rows out_dir=runs/kale

On a cluster (``synth`` and ``out`` on storage every node sees; runs on the driver)::

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"env_vars": {"KALE_RAY_CACHE": "/mnt/shared/cache/kale_ray"}}' \\
        -- python jobs/prepare.py synth=/mnt/shared/runs/synth out=/mnt/shared/runs/rows model=builtin:smollm2-135m

Same as ``kale-ray prepare --synth runs/synth --out runs/rows`` (one table of jobs in ``kale_ray/cli.py``).
Overrides are ``key.sub=value``; ``kale-ray show-config prepare`` lists them.
"""
import sys

from kale_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
