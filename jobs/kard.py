"""KARD end to end: KB + BM25, teacher rationales + verifier, students with/without knowledge, reranker, evaluation.

Local (starts Ray on this machine)::

    python jobs/kard.py --config configs/kard_umls.yaml
    python jobs/kard.py --config configs/kard_umls.yaml teacher.num_rationales=4 eval.num_samples=5

On a cluster (``out`` must be on storage every node sees)::

    ray job submit --working-dir . -- python jobs/kard.py --config configs/kard_umls.yaml \\
        train.num_workers=8 train.use_gpu=true teacher.generation.num_gpus_per_replica=1 \\
        eval.generation.num_gpus_per_replica=1 teacher.num_rationales=10 out=/mnt/shared/runs/kard_umls

Same as ``kale-ray kard --config configs/kard_umls.yaml`` (one table of jobs in ``kale_ray/cli.py``). Overrides are ``key.sub=value``.
Writes ``out/{metrics.json, report.md}``; a rerun reuses finished stages.
"""
import sys

from kale_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["kard", *sys.argv[1:]]))
