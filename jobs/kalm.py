"""KaLM end to end: evaluate the base model, align it (dual-view KG contrastive + triple-completion LM), evaluate again.

Local (starts Ray on this machine)::

    python jobs/kalm.py --config configs/kalm_umls.yaml
    python jobs/kalm.py --config configs/kalm_umls.yaml train.max_steps=200 train.kalm.gather_negatives=true

On a cluster (``out`` must be on storage every node sees)::

    ray job submit --working-dir . -- python jobs/kalm.py --config configs/kalm_umls.yaml \\
        train.num_workers=8 train.use_gpu=true eval.generation.num_gpus_per_replica=1 out=/mnt/shared/runs/kalm_umls

Same as ``kale-ray kalm --config configs/kalm_umls.yaml``. Overrides are ``key.sub=value``.
Writes ``out/{metrics.json, report.md}``; a rerun reuses finished stages.
"""
from __future__ import annotations

import argparse
import sys

from kale_ray.config import load_config
from kale_ray.kalm.config import KaLMJobConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML file with KaLMJobConfig fields")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args(argv)
    cfg = load_config(KaLMJobConfig, args.config, args.overrides)
    from kale_ray.kalm.recipe import run_kalm

    run_kalm(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
