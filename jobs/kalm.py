"""KaLM end to end: evaluate the base model, align it (dual-view KG contrastive + triple-completion LM), evaluate again.

Local (starts Ray on this machine)::

    python jobs/kalm.py --config configs/kalm_umls.yaml
    python jobs/kalm.py --config configs/kalm_umls.yaml train.max_steps=200 train.kalm.gather_negatives=true

On a cluster (``out`` must be on storage every node sees)::

    ray job submit --working-dir . -- python jobs/kalm.py --config configs/kalm_umls.yaml \\
        train.num_workers=8 train.use_gpu=true eval.generation.num_gpus_per_replica=1 out=/mnt/shared/runs/kalm_umls

Same as ``kale-ray kalm --config configs/kalm_umls.yaml`` (one table of jobs in ``kale_ray/cli.py``). Overrides are ``key.sub=value``.
Writes ``out/{metrics.json, report.md}``; a rerun reuses finished stages.
"""
import sys

from kale_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["kalm", *sys.argv[1:]]))
