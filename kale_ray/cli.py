"""``kale-ray``: one CLI for every stage. Each subcommand takes ``--config FILE`` plus ``key.sub=value`` overrides.

    kale-ray demo --out runs/demo                       # the whole KALE pipeline on UMLS + SmolLM2
    kale-ray synthesize --config configs/synth_umls.yaml out_dir=runs/synth
    kale-ray train --config configs/train_kale.yaml data=runs/synth/train_rows
    kale-ray evaluate --config configs/eval.yaml model.name=runs/train/merged
    kale-ray kalm --config configs/kalm_umls.yaml      # KaLM: eval before, align, eval after, report
    kale-ray kard --config configs/kard_umls.yaml      # KARD: rationales, students +/- knowledge, reranker, report
    kale-ray knowtuning --config configs/knowtuning_hpo.yaml   # KnowTuning: Stage I + II, fact-level eval, report
    kale-ray prepare --synth runs/synth --out runs/train_rows   # render training rows for a student
    kale-ray show-config train                          # print a job's config with its defaults
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from kale_ray.llm import QUIET_ENV
from kale_ray.config import ConfigError, DemoConfig, EvalConfig, SynthConfig, TrainConfig, load_config, to_dict
from kale_ray.kalm.config import KaLMJobConfig
from kale_ray.kard.config import KARDJobConfig
from kale_ray.knowtuning.config import KnowTuningJobConfig

JOBS = {"demo": DemoConfig, "synthesize": SynthConfig, "train": TrainConfig, "evaluate": EvalConfig,
        "kalm": KaLMJobConfig, "kard": KARDJobConfig, "knowtuning": KnowTuningJobConfig}


def _init_ray(address: str | None = None) -> None:
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True, runtime_env=QUIET_ENV)
        else:
            ray.init(num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False, log_to_driver=True, runtime_env=QUIET_ENV)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kale-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in JOBS:
        p = sub.add_parser(name, help=f"run the {name} job")
        p.add_argument("--config", "-c", default=None, help="YAML config (see configs/)")
        if name == "demo":
            p.add_argument("--out", default=None, help="output folder (same as out=...)")
    p = sub.add_parser("prepare", help="render synthesised rows into a student's training rows")
    p.add_argument("--synth", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="builtin:smollm2-135m")
    p = sub.add_parser("show-config", help="print a job's full config (defaults + overrides) as YAML")
    p.add_argument("job", choices=list(JOBS))
    p.add_argument("--config", "-c", default=None)
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if "=" not in x or x.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides are key.sub=value)")
    args.overrides = extra

    try:
        if args.cmd == "show-config":
            import yaml

            print(yaml.safe_dump(to_dict(load_config(JOBS[args.job], args.config, args.overrides)), sort_keys=False))
            return 0
        if args.cmd == "prepare":
            from kale_ray.models import resolve_model
            from kale_ray.synth.format import write_training_rows

            print(json.dumps(write_training_rows(args.synth, resolve_model(args.model), args.out), indent=2))
            return 0
        overrides = list(args.overrides)
        if args.cmd == "demo" and args.out:
            overrides.append(f"out={args.out}")
        cfg = load_config(JOBS[args.cmd], args.config, overrides)
    except ConfigError as e:
        print(f"kale-ray {args.cmd}: config error: {e}", file=sys.stderr)
        return 2

    if args.cmd == "demo":
        from kale_ray.demo import run_demo

        run_demo(cfg)
    elif args.cmd == "synthesize":
        from kale_ray.synth.pipeline import run_synthesis

        _init_ray()
        run_synthesis(cfg)
    elif args.cmd == "train":
        from kale_ray.train.trainer import run_training

        res = run_training(cfg)
        print(json.dumps({k: res.summary[k] for k in ("steps", "final_loss", "samples_per_s", "rejected")}, indent=2))
    elif args.cmd == "evaluate":
        from kale_ray.eval.evaluate import evaluate

        _init_ray()
        m = evaluate(cfg)
        print(json.dumps({k: m[k] for k in ("accuracy", "accuracy_ci95", "probe_accuracy", "known_and_incorrect_rate")}))
    elif args.cmd == "kalm":
        from kale_ray.kalm.recipe import run_kalm

        m = run_kalm(cfg)
        print(json.dumps({label: ev["kg_completion"]["both"] for label, ev in m["eval"].items()}, indent=2))
    elif args.cmd == "kard":
        from kale_ray.kard.recipe import run_kard

        m = run_kard(cfg)
        print(json.dumps({k: v["accuracy"] for k, v in m["accuracy"].items()}, indent=2))
    elif args.cmd == "knowtuning":
        from kale_ray.knowtuning.pipeline import run_knowtuning

        m = run_knowtuning(cfg)
        print(json.dumps(m["eval"]["results"] if "eval" in m else m["timings"], indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
