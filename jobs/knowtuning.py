"""KnowTuning end to end: long-form QA from a KG -> Stage I (atomic facts, perplexity, rewrites, SFT) -> Stage II (DPO) -> fact-level eval.

Local (starts Ray on this machine)::

    python jobs/knowtuning.py --config configs/knowtuning_hpo.yaml
    python jobs/knowtuning.py --config configs/knowtuning_hpo.yaml qa.num_questions=40 stage1.alpha=0.3 out=runs/kt_small

On a cluster (``out`` must be on storage every node sees)::

    ray job submit --working-dir . -- python jobs/knowtuning.py --config configs/knowtuning_hpo.yaml \\
        stage1.train.num_workers=8 stage1.train.use_gpu=true stage2.train.num_workers=8 stage2.train.use_gpu=true \\
        generation.num_gpus_per_replica=1 eval.generation.num_gpus_per_replica=1 out=/mnt/shared/runs/knowtuning_hpo

One stage at a time (each reuses the stages before it): ``stop_after=qa | stage1_data | stage1 | stage2``,
e.g. ``python jobs/knowtuning.py --config configs/knowtuning_hpo.yaml stop_after=stage1_data`` (QA, atomic
facts, perplexity, rewrites) and later the same command without ``stop_after`` for the rest.

Same as ``kale-ray knowtuning --config configs/knowtuning_hpo.yaml`` (one table of jobs in ``kale_ray/cli.py``). Overrides are ``key.sub=value``.
Writes ``out/{qa,stage1,baseline,stage2,eval}/``, ``out/metrics.json`` and ``out/report.md``;
a rerun reuses finished stages. Stage II alone: ``jobs/knowtuning_dpo.py``.
"""
import sys

from kale_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["knowtuning", *sys.argv[1:]]))
