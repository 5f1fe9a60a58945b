"""``kale-ray``: one CLI for every job. Each subcommand takes ``--config FILE`` plus ``key.sub=value`` overrides.

    kale-ray demo --config configs/demo.yaml --out runs/demo   # the whole KALE recipe on HPO + SmolLM2 (alias: kale)
    kale-ray synthesize --config configs/synth_umls.yaml out_dir=runs/synth
    kale-ray prepare --synth runs/synth --out runs/rows --model builtin:smollm2-135m   # a student's training rows
    kale-ray train --config configs/train_kale.yaml data=runs/rows out_dir=runs/kale
    kale-ray evaluate --config configs/eval.yaml model.name=runs/kale/merged data=runs/synth/qa/test.jsonl
    kale-ray kalm --config configs/kalm_umls.yaml      # KaLM: eval before, align, eval after, report
    kale-ray kard --config configs/kard_umls.yaml      # KARD: rationales, students +/- knowledge, reranker, report
    kale-ray knowtuning --config configs/knowtuning_hpo.yaml   # KnowTuning: Stage I + II, fact-level eval, report
    kale-ray knowtuning-dpo --config configs/knowtuning_dpo.yaml   # KnowTuning Stage II alone: pairs + DPO
    kale-ray show-config train                          # print a job's config with its defaults
    kale-ray synthesize kg.source=my_kg.tsv --print-config   # the resolved config, as the job would run it

``JOBS`` is the one table of jobs: ``{job: (config class, run function)}``; every ``jobs/*.py`` is a
shim that calls :func:`main` with its job name, so both share one error handling: a bad key or value,
a missing or malformed input file, an unwritable ``out_dir`` or a stale one exits with status 2 and
one line on stderr (``kale-ray <job>: config error: ...``, ``kale-ray <job>: kg.tsv:11: ...``), no
traceback (``--debug`` shows it); a bug keeps its traceback (status 1). Config and inputs are
checked (:func:`kale_ray.runtime.preflight.preflight`) before Ray or any engine starts.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
import types
import typing
from typing import Any, Callable

from kale_ray.runtime.stages import StaleOutputError
from kale_ray.runtime.storage import StorageError
from kale_ray.config import (ConfigError, KALEJobConfig, EvalConfig, KALETrainConfig, SynthConfig, TrainConfig, load_config,
                             to_dict)
from kale_ray.methods.kalm.config import KaLMJobConfig
from kale_ray.methods.kard.config import KARDJobConfig
from kale_ray.methods.knowtuning.config import KnowTuningDPOJobConfig, KnowTuningJobConfig
from kale_ray.runtime.preflight import PreflightError, preflight


@dataclasses.dataclass
class PrepareConfig:
    """Render the kept synthesised rows (``synth/data/shard-*.jsonl``) into a student's training rows
    (JSONL under ``out/`` with prompt, teacher_prompt, completion): the ``data`` of ``kale-ray train``."""

    synth: str = "runs/synth"  # a synthesis out_dir (or its data/ folder)
    out: str = "runs/rows"
    model: str = "builtin:smollm2-135m"  # the student whose chat template renders the rows
    trust_remote_code: bool = False


def _ray(address: str | None = None, workers: int = 0, job: str = "") -> None:
    from kale_ray.runtime.ray import init_ray

    where = init_ray(address, workers)
    print(f"[job] {job or 'kale-ray'}: {where}", flush=True)


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str), flush=True)


def run_kale(cfg: KALEJobConfig, args: argparse.Namespace) -> None:
    from kale_ray.methods.kale.recipe import run_demo

    _ray(cfg.ray_address, cfg.train.num_workers, job="kale")
    m = run_demo(cfg)
    _print({"sft": m["sft"], "kale": m["kale"], "report": f"{cfg.out}/report.md",
            "minutes": round(m["timings"]["total_this_run"] / 60, 1)})


def run_synthesize(cfg: SynthConfig, args: argparse.Namespace) -> None:
    from kale_ray.synth.pipeline import run_synthesis

    _ray(job="synthesize")
    s = run_synthesis(cfg)
    keys = ("rows_in", "rows_out", "rejected", "teacher_rejected", "teacher_counts", "shards_total", "shards_skipped")
    _print({**{k: getattr(s, k) for k in keys}, "seconds": round(s.seconds["total"], 1), "out_dir": cfg.out_dir})


def run_prepare(cfg: PrepareConfig, args: argparse.Namespace) -> None:
    from kale_ray.models import resolve_model
    from kale_ray.synth.format import write_training_rows

    _ray(job="prepare")  # shards are rendered by Ray Data tasks
    _print(write_training_rows(cfg.synth, resolve_model(cfg.model), cfg.out, cfg.trust_remote_code))


def run_train(cfg: TrainConfig, args: argparse.Namespace) -> None:
    from kale_ray.train.trainer import run_training

    res = run_training(cfg, run_name=args.run_name)  # starts (or joins) Ray itself, sized for its workers
    keys = ("steps", "samples", "final_loss", "first_loss", "seconds_per_step", "samples_per_s", "wall_seconds",
            "rejected")
    _print({k: res.summary.get(k) for k in keys})
    print(f"merged model: {res.merged_dir}\nadapter: {res.adapter_dir}\nhistory: {res.out_dir}/history.jsonl")


def run_evaluate(cfg: EvalConfig, args: argparse.Namespace) -> None:
    from kale_ray.methods.kale.evaluate import evaluate

    _ray(job="evaluate")
    m = evaluate(cfg, label=cfg.model.name)
    keys = ("accuracy", "accuracy_ci95", "probe_accuracy", "known_and_incorrect_rate", "n_questions")
    _print({k: m.get(k) for k in keys} | {"out_dir": cfg.out_dir})


def run_kalm_job(cfg: KaLMJobConfig, args: argparse.Namespace) -> None:
    from kale_ray.methods.kalm.recipe import run_kalm

    m = run_kalm(cfg)  # starts (or joins) Ray itself
    _print({label: ev["kg_completion"]["both"] for label, ev in m["eval"].items()})


def run_kard_job(cfg: KARDJobConfig, args: argparse.Namespace) -> None:
    from kale_ray.methods.kard.recipe import run_kard

    m = run_kard(cfg)  # starts (or joins) Ray itself
    _print({k: v["accuracy"] for k, v in m["accuracy"].items()})


def run_knowtuning_job(cfg: KnowTuningJobConfig, args: argparse.Namespace) -> None:
    from kale_ray.methods.knowtuning.recipe import run_knowtuning

    m = run_knowtuning(cfg)  # starts (or joins) Ray itself
    _print(m["eval"]["results"] if "eval" in m else m["timings"])


def run_knowtuning_dpo(cfg: KnowTuningDPOJobConfig, args: argparse.Namespace) -> None:
    from kale_ray.methods.knowtuning.stage2 import run_dpo_stage

    summary = run_dpo_stage(cfg)  # starts (or joins) Ray itself
    _print({k: summary.get(k) for k in ("pairs", "train", "rewards_after", "seconds")})


Run = Callable[[Any, argparse.Namespace], None]
_KALE = (KALEJobConfig, run_kale)
# The one table of jobs. ``demo`` is the README's first command, an alias of ``kale`` (jobs/kale.py).
JOBS: dict[str, tuple[type, Run]] = {
    "kale": _KALE,
    "demo": _KALE,
    "synthesize": (SynthConfig, run_synthesize),
    "prepare": (PrepareConfig, run_prepare),
    "train": (KALETrainConfig, run_train),  # loss=kalm / dpo / sft / a plug-in: that loss's TrainConfig
    "evaluate": (EvalConfig, run_evaluate),
    "kalm": (KaLMJobConfig, run_kalm_job),
    "kard": (KARDJobConfig, run_kard_job),
    "knowtuning": (KnowTuningJobConfig, run_knowtuning_job),
    "knowtuning-dpo": (KnowTuningDPOJobConfig, run_knowtuning_dpo),
}
ALIASES = {"demo": "kale"}
# Flags kept for the README's commands; each is the same as the override ``<key>=VALUE``.
_FLAGS = {"kale": ("out",), "demo": ("out",), "prepare": ("synth", "out", "model")}


def _summary(cls: type) -> str:
    return (cls.__doc__ or cls.__name__).strip().splitlines()[0]


def _keys(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, Any]]:
    """(dotted key, annotation) of every leaf setting of ``cls``, depth first."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), tp)
        if dataclasses.is_dataclass(tp):
            yield from _keys(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp


def _example_overrides(cls: type) -> str:
    """This job's own spelling of common overrides (``kg.source=`` in synthesize, ``synth.kg.source=`` in the demo)."""
    keys = [k for k, _ in _keys(cls)]
    kg = next((k for k in keys if k.endswith("kg.source")), None)
    out = next((k for k in ("out_dir", "out") if k in keys), None)
    num = next((k for k in ("qa.num_questions", "synth.qa.num_questions", "pairs.num_questions", "lr", "train.lr")
                if k in keys), None)
    picks = ([f"{kg}=my_kg.tsv"] if kg else []) + [f"{k}={getattr(cls(), k)}" for k in ("synth", "data") if k in keys]
    picks += ([f"{num}=100" if "num" in num else f"{num}=1e-4"] if num else []) + ([f"{out}=runs/x"] if out else [])
    return " ".join(picks)


def _epilog(name: str, cls: type) -> str:
    return (f"Settings: key.sub=value overrides after the options, on top of --config FILE, e.g.\n"
            f"    kale-ray {name} {_example_overrides(cls)}\n"
            f"List every key with its default:  kale-ray show-config {name}\n"
            f"Print the resolved config and exit:  kale-ray {name} [--config FILE] [key.sub=value ...] --print-config\n"
            f"A bad key or value, a missing or malformed input, or an unwritable output exits with status 2\n"
            f"and one line on stderr, before Ray starts (--debug: with the traceback).")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kale-ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, (cls, _) in JOBS.items():
        alias = f" (alias of {ALIASES[name]})" if name in ALIASES else ""
        p = sub.add_parser(name, help=_summary(cls) + alias, description=_summary(cls) + alias,
                           epilog=_epilog(name, cls), formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--config", "-c", default=None, help=f"YAML file with {cls.__name__} fields (see configs/)")
        p.add_argument("--print-config", action="store_true",
                       help="print the resolved config (defaults + --config + overrides) as YAML and exit")
        p.add_argument("--debug", action="store_true", help="show the traceback of an input or config error too")
        for flag in _FLAGS.get(name, ()):
            p.add_argument(f"--{flag}", default=None, help=f"same as {flag}=...")
        if name == "train":
            p.add_argument("--run-name", default=None, help="Ray Train run name (default: 'train'); same name resumes")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    p = sub.add_parser("show-config", help="print a job's full config (defaults + overrides) as YAML",
                       epilog="Overrides are key.sub=value, as for the job itself.")
    p.add_argument("job", choices=list(JOBS))
    p.add_argument("--config", "-c", default=None)
    p.add_argument("--debug", action="store_true", help="show the traceback of a config error too")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    return parser


def _input_error_types() -> tuple[type, ...]:
    """The errors that mean bad input or config, not a bug: one line and exit 2 (the readers raise them)."""
    from kale_ray.core.kg import KGFormatError
    from kale_ray.core.qa import QAFormatError
    from kale_ray.methods.kard.kb import CorpusFormatError
    from kale_ray.synth.pipeline import TeacherFailureError

    return (ConfigError, PreflightError, StaleOutputError, StorageError, KGFormatError, QAFormatError, CorpusFormatError,
            TeacherFailureError)


def input_error(e: BaseException) -> BaseException | None:
    """The input / config error behind ``e``: itself, or the exception a Ray task or actor error carries
    (``RayTaskError.cause``; Ray Data's user-code wrapper's ``__cause__``); None for anything else (a bug)."""
    kinds = _input_error_types()
    for _ in range(8):
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException) and cause is not e:  # a Ray error: its str() holds the remote traceback
            e = cause
        elif isinstance(e, kinds):
            return e
        elif type(e).__module__.startswith("ray.") and e.__cause__ is not None:
            e = e.__cause__
        else:
            return None
    return None


def one_line(job: str, e: BaseException) -> str:
    """``kale-ray <job>: <message>`` on one line (``config error:`` before a config key's message)."""
    return f"kale-ray {job}: {'config error: ' if isinstance(e, ConfigError) else ''}{' '.join(str(e).split())}"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    bad = [x for x in extra if "=" not in x or x.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides are key.sub=value)")
    overrides = list(args.overrides) + extra
    job = args.job if args.cmd == "show-config" else args.cmd
    cls, run = JOBS[job]
    overrides += [f"{flag}={getattr(args, flag)}" for flag in _FLAGS.get(args.cmd, ())
                  if getattr(args, flag, None) is not None]
    try:
        cfg = load_config(cls, args.config, overrides)
        if args.cmd == "show-config" or args.print_config:
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            return 0
        preflight(job, cfg)  # inputs readable (small KGs parsed), out_dir writable: before Ray or any engine
        run(cfg, args)
    except Exception as e:  # input and config errors: one line, exit 2; anything else is a bug: its traceback
        err = input_error(e)
        if err is None:
            raise
        if args.debug:
            traceback.print_exception(e)
        print(one_line(args.cmd, err), file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
