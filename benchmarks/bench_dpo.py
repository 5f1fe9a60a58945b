"""DPO training step: the project's ``dpo`` loss (kale_ray.methods.knowtuning.dpo) vs TRL's ``DPOTrainer``.

    python benchmarks/bench_dpo.py            # SmolLM2-135M-Instruct, LoRA r8 q/v, 4 pairs/step, 8 timed steps x 2 rounds
    python benchmarks/bench_dpo.py --quick    # tiny Llama, 4 timed steps x 1 round
    python benchmarks/bench_dpo.py --full-ft  # full fine-tuning instead of LoRA

Same model and initial weights (LoRA adapters seeded alike; the check is a hash of the
trainable tensors), same KnowTuning comparison pairs (UMLS neighbourhood answers with
deleted / KG-revised / shuffled facts, built by ``kale_ray.methods.knowtuning``), same batches in the
same order (TRL's ``train_sampling_strategy="sequential"``), same sequence lengths, sigmoid
loss with beta 0.1 and no SFT term (``gamma 0``; TRL's ``loss_type=["sigmoid"]``), AdamW
lr 1e-5 constant, weight decay 0, gradient clipping 1.0, fp32, one process on the CPU,
torch threads as set (both in this process).

Timed: one optimizer step from a collated batch to updated weights -- forward, loss,
backward, clip, AdamW step, zero_grad. For TRL that is the Trainer's ``on_step_begin`` ->
``on_step_end`` window (``training_step`` + clip + ``optimizer.step`` + scheduler +
``zero_grad``); its dataloader and logging fall outside, as our collator does (timed apart:
ours tokenises in the collator, TRL tokenises the whole dataset once at start-up, timed
in ``trl_init_s``). The first ``--warmup`` steps of each run are left out.

Variants (each a fresh model from the same weights, rounds interleaved ours/TRL, order
alternating):

* ``precomputed``: the reference log-probs computed once before training -- ours by
  ``PairScorer`` (the recipe's reference pass, here in this process), TRL by
  ``precompute_ref_log_probs=True`` (inside ``DPOTrainer.__init__``). The headline.
* ``per_step_reference`` (``--per-step``): TRL's default (``precompute_ref_log_probs=False``;
  with LoRA the reference is the model with its adapter off, a no-grad forward each step)
  vs ours with ``dpo.reference=adapter_disabled`` (the same thing). LoRA only.

``ours`` is the registry's compute in a plain torch loop (AdamW, clip): the step's own cost,
as TRL runs here on accelerate without DeepSpeed. ``--deepspeed`` adds ``ours_deepspeed``: the
trainer's real step (``kale_ray.train.loop._build_engine`` + ``_train_step``: DeepSpeed ZeRO-2
with torch AdamW, one gloo rank, no Ray), what a Ray Train worker runs.

Agreement: the reference log-probs of every pair (ours vs TRL's precompute), and the loss of
every step (the same batches from the same weights: identical steps give identical
trajectories up to float noise; the first step's loss is ln 2 for both by construction, since
policy == reference).

Writes ``benchmarks/results/dpo.json`` (``full`` / ``quick`` entries).
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import Load, machine, now, versions, write_result  # noqa: E402

TARGET = 1.3  # ours / TRL samples (pairs) per second


# --------------------------------------------------------------------------- data and model


def make_rows(n: int, tok, seed: int) -> tuple[list[dict], dict]:
    """``n`` KnowTuning comparison pairs on UMLS, rendered with the model's chat template."""
    from kale_ray.methods.knowtuning.config import KnowTuningDPOJobConfig
    from kale_ray.methods.knowtuning.data import render_pair_rows
    from kale_ray.methods.knowtuning.stage2 import make_pairs

    cfg = KnowTuningDPOJobConfig()
    cfg.pairs.kg.source = "builtin:umls"
    cfg.pairs.seed = seed
    pairs, _, info = make_pairs(cfg)
    rows = render_pair_rows(pairs, tok)
    # a fixed shuffle so that the batches mix the three kinds (pairs come grouped per question)
    import numpy as np

    order = np.random.default_rng([seed, 1]).permutation(len(rows))
    rows = [rows[i] for i in order][:n]
    return rows, {"pairs_built": len(pairs), "by_kind_built": info["by_kind"], "questions": info["questions"]}


def fresh_policy(model_path: str, lora: dict | None, seed: int):
    from kale_ray.models import load_causal_lm

    torch.manual_seed(seed)
    lm = load_causal_lm(model_path)
    lm.config.use_cache = False
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        lm = get_peft_model(lm, LoraConfig(task_type="CAUSAL_LM", **lora))
    return lm


def trainable_hash(lm) -> str:
    h = hashlib.sha256()
    for name, p in sorted(lm.named_parameters()):
        if p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- ours


def train_cfg(args, reference: str):
    from kale_ray.methods.knowtuning.config import DPOConfig, DPOTrainConfig

    cfg = DPOTrainConfig(loss="dpo", lr=args.lr, weight_decay=0.0, warmup_steps=0, lr_schedule="constant",
                      max_grad_norm=1.0, micro_batch_size=args.batch, grad_accum=1, max_seq_len=args.max_seq_len,
                      seed=args.seed)
    cfg.dpo = DPOConfig(beta=args.beta, gamma=0.0, loss_type="sigmoid", reference=reference)
    cfg.lora.enabled = not args.full_ft
    return cfg


def run_ours(args, model_path, tok, rows, reference: str) -> dict:
    """The registry's ``dpo`` compute in a plain torch loop: what ``_train_step`` does per worker at world 1."""
    from kale_ray.train.heads import AnswerLogits
    from kale_ray.train.registry import StepContext, get_loss

    spec = get_loss("dpo")
    cfg = train_cfg(args, reference)
    collator = spec.collator_factory(tok, cfg)
    lm = fresh_policy(model_path, args.lora, args.seed)
    init_hash = trainable_hash(lm)
    model = AnswerLogits(lm).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = args.warmup + args.steps
    step_s, collate_s, losses, metrics_log = [], [], [], []
    for i in range(steps):
        a = time.perf_counter()
        batch = collator(rows[i * args.batch:(i + 1) * args.batch])
        b = time.perf_counter()
        loss, metrics = spec.compute(model, batch, cfg, StepContext(global_count=spec.count_fn(batch)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        c = time.perf_counter()
        collate_s.append(b - a)
        step_s.append(c - b)
        losses.append(float(loss.detach()))
        metrics_log.append({k: float(v) for k, v in metrics.items()})
    if collator.rejects.counts():
        raise RuntimeError(f"our collator rejected rows: {collator.rejects.counts()}")
    del model, lm, opt
    gc.collect()
    return {"step_s": step_s, "collate_s": collate_s, "losses": losses, "metrics": metrics_log,
            "init_trainable_hash": init_hash}


def run_ours_deepspeed(args, model_path, tok, rows, reference: str) -> dict:
    """The trainer's own step: ``_build_engine`` (DeepSpeed ZeRO-2, torch AdamW) + ``_train_step``, world 1, gloo."""
    import torch.distributed as tdist

    from kale_ray.train import loop
    from kale_ray.train.registry import get_loss

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", loop.torch_extensions_dir())
    if not tdist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29517"), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        tdist.init_process_group("gloo", rank=0, world_size=1)
    spec = get_loss("dpo")
    cfg = train_cfg(args, reference)
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 8, 16, 0.0
    cfg.lora.target_modules = ["q_proj", "v_proj"]
    cfg.zero_stage = 2
    collator = spec.collator_factory(tok, cfg)
    threads = torch.get_num_threads()
    engine, scheduler, _ = loop._build_engine(cfg, model_path, args.warmup + args.steps, 1)
    torch.set_num_threads(threads)
    init_hash = trainable_hash(engine.module.lm)
    engine.train()
    step_s, collate_s, losses = [], [], []
    for i in range(args.warmup + args.steps):
        a = time.perf_counter()
        batch = collator(rows[i * args.batch:(i + 1) * args.batch])
        b = time.perf_counter()
        totals = loop._train_step(engine, spec, cfg, [batch], 0, 1)
        scheduler.step()
        c = time.perf_counter()
        collate_s.append(b - a)
        step_s.append(c - b)
        losses.append(float(totals["loss"]))
    del engine
    gc.collect()
    return {"step_s": step_s, "collate_s": collate_s, "losses": losses, "init_trainable_hash": init_hash}


def precompute_ours(args, model_path, rows) -> tuple[list[dict], float]:
    from kale_ray.methods.knowtuning.dpo import REF_CHOSEN, REF_REJECTED, PairScorer

    t = time.perf_counter()
    scorer = PairScorer(model_path, args.max_seq_len, batch_size=args.batch)
    chosen, rejected = scorer.score(rows)
    secs = time.perf_counter() - t
    del scorer
    gc.collect()
    return [{**r, REF_CHOSEN: float(c), REF_REJECTED: float(j)} for r, c, j in zip(rows, chosen, rejected)], secs


# --------------------------------------------------------------------------- TRL


def run_trl(args, model_path, tok, rows, precompute: bool) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0, self.step_s, self.logs = None, [], []

        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.step_s.append(time.perf_counter() - self.t0)

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.logs.append(dict(logs))

    steps = args.warmup + args.steps
    lm = fresh_policy(model_path, args.lora, args.seed)
    init_hash = trainable_hash(lm)
    ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                            for r in rows[: steps * args.batch]])
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_DATASETS_CACHE"] = tmp  # no precompute cache carried over between runs
        cfg = DPOConfig(
            output_dir=tmp, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, max_steps=steps, logging_steps=1, report_to="none", save_strategy="no",
            bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False, beta=args.beta,
            loss_type=["sigmoid"], precompute_ref_log_probs=precompute, precompute_ref_batch_size=args.batch,
            max_length=args.max_seq_len, seed=args.seed, data_seed=args.seed, train_sampling_strategy="sequential",
            dataloader_num_workers=0, disable_tqdm=True, optim="adamw_torch",
        )
        timer = StepTimer()
        t = time.perf_counter()
        trainer = DPOTrainer(model=lm, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[timer])
        init_s = time.perf_counter() - t
        ref = None
        if precompute:
            tds = trainer.train_dataset
            ref = {"chosen": [float(x) for x in tds["ref_chosen_logps"]],
                   "rejected": [float(x) for x in tds["ref_rejected_logps"]],
                   "lengths": [len(p) + len(c) for p, c in zip(tds["prompt_ids"], tds["chosen_ids"])]}
        t = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - t
    losses = [float(l["loss"]) for l in timer.logs]
    out = {"step_s": timer.step_s, "losses": losses, "logs": timer.logs, "init_s": init_s, "train_s": train_s,
           "init_trainable_hash": init_hash, "reference": ref}
    del trainer, lm
    gc.collect()
    return out


# --------------------------------------------------------------------------- main


def summarize(step_lists: list[list[float]], warmup: int, batch: int) -> dict:
    timed = [s for steps in step_lists for s in steps[warmup:]]
    med = statistics.median(timed)
    return {"timed_steps": len(timed), "step_s_median": med, "step_s_min": min(timed), "step_s_mean": statistics.mean(timed),
            "pairs_per_s": batch / med, "sequences_per_s": 2 * batch / med}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="builtin:tiny-llama, 4 timed steps, 1 round")
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=4, help="pairs per step (2x sequences per forward)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps per run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--full-ft", action="store_true", help="full fine-tuning (default: LoRA r8 on q/v, the recipe's)")
    ap.add_argument("--per-step", action="store_true", help="also the per-step-reference variant (TRL's default)")
    ap.add_argument("--deepspeed", action="store_true",
                    help="also time the trainer's own step (DeepSpeed ZeRO-2 engine, world 1) in the rounds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.model = args.model or "builtin:tiny-llama"
        args.steps, args.rounds = min(args.steps, 4), 1
    args.model = args.model or "builtin:smollm2-135m"
    args.lora = None if args.full_ft else {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                                           "target_modules": ["q_proj", "v_proj"]}
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from kale_ray.models import load_tokenizer, resolve_model

    load = Load()
    model_path = resolve_model(args.model)
    tok = load_tokenizer(model_path)
    n = (args.warmup + args.steps) * args.batch
    rows, pair_info = make_rows(n, tok, args.seed)
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} pairs, {n} needed")
    print(f"model {args.model} ({'full fine-tuning' if args.full_ft else 'LoRA r8 q/v'}), {n} pairs, "
          f"batch {args.batch} pairs, threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}", flush=True)

    ref_rows, ours_ref_s = precompute_ours(args, model_path, rows)
    print(f"ours: reference pass over {n} pairs {ours_ref_s:.1f}s", flush=True)

    runs = {"ours": [], "trl": []}
    who_all = ("ours", "trl")
    if args.deepspeed:
        if args.full_ft:
            raise SystemExit("--deepspeed is wired for the LoRA setting only")
        runs["ours_deepspeed"] = []
        who_all = ("ours", "trl", "ours_deepspeed")
    for rnd in range(args.rounds):
        order = who_all if rnd % 2 == 0 else tuple(reversed(who_all))
        for who in order:
            la = os.getloadavg()[0]
            if who == "ours":
                r = run_ours(args, model_path, tok, ref_rows, "precomputed")
            elif who == "ours_deepspeed":
                r = run_ours_deepspeed(args, model_path, tok, ref_rows, "precomputed")
            else:
                r = run_trl(args, model_path, tok, rows, precompute=True)
            r["round"], r["loadavg_before"], r["loadavg_after"] = rnd, la, os.getloadavg()[0]
            runs[who].append(r)
            print(f"round {rnd + 1} {who:4s}: median step {statistics.median(r['step_s'][args.warmup:]):.3f}s, "
                  f"losses {[round(x, 4) for x in r['losses']]}, load {la:.1f} -> {r['loadavg_after']:.1f}", flush=True)
        load.mark(f"round {rnd + 1}")

    s_ours = summarize([r["step_s"] for r in runs["ours"]], args.warmup, args.batch)
    s_trl = summarize([r["step_s"] for r in runs["trl"]], args.warmup, args.batch)
    ratio = s_ours["pairs_per_s"] / s_trl["pairs_per_s"]
    s_ds = summarize([r["step_s"] for r in runs["ours_deepspeed"]], args.warmup, args.batch) if args.deepspeed else None
    ratio_ds = s_ds["pairs_per_s"] / s_trl["pairs_per_s"] if s_ds else None

    trl_ref = runs["trl"][0]["reference"]
    ours_rc = [r["ref_chosen_logp"] for r in ref_rows[: len(trl_ref["chosen"])]]
    ours_rr = [r["ref_rejected_logp"] for r in ref_rows[: len(trl_ref["rejected"])]]
    ref_diff = max(max(abs(a - b) for a, b in zip(ours_rc, trl_ref["chosen"])),
                   max(abs(a - b) for a, b in zip(ours_rr, trl_ref["rejected"])))
    lo, lt = runs["ours"][0]["losses"], runs["trl"][0]["losses"]
    loss_diffs = [abs(a - b) for a, b in zip(lo, lt)]
    agreement = {
        "first_step_loss_ours": lo[0], "first_step_loss_trl": lt[0], "first_step_abs_diff": loss_diffs[0],
        "ln2": math.log(2), "max_abs_loss_diff_over_steps": max(loss_diffs),
        "loss_diff_per_step": loss_diffs,
        "reference_logp_max_abs_diff": ref_diff,
        "reference_logp_scale": statistics.mean(abs(x) for x in ours_rc),
        "same_initial_trainable_weights": len({r["init_trainable_hash"] for k in ("ours", "trl") for r in runs[k]}) == 1,
        "deepspeed_engine_same_initial_weights": (len({r["init_trainable_hash"] for v in runs.values() for r in v}) == 1
                                                  if args.deepspeed else None),
        "deepspeed_engine_max_abs_loss_diff_vs_trl": (max(abs(a - b) for a, b in zip(runs["ours_deepspeed"][0]["losses"], lt))
                                                      if args.deepspeed else None),
        "note": "step 1 is ln 2 for both by construction (policy == reference); later steps and the reference "
                "log-probs are the real check",
    }
    print(f"precomputed reference: ours {s_ours['pairs_per_s']:.2f} pairs/s (median step {s_ours['step_s_median']:.3f}s), "
          f"TRL {s_trl['pairs_per_s']:.2f} pairs/s ({s_trl['step_s_median']:.3f}s): ratio {ratio:.2f}x "
          f"(target >= {TARGET}x: {'met' if ratio >= TARGET else 'NOT met'})")
    if s_ds:
        print(f"ours through the trainer's DeepSpeed ZeRO-2 engine: {s_ds['pairs_per_s']:.2f} pairs/s "
              f"(median step {s_ds['step_s_median']:.3f}s): {ratio_ds:.2f}x TRL; losses "
              f"{[round(x, 4) for x in runs['ours_deepspeed'][0]['losses']]}")
    print(f"agreement: reference log-probs max |diff| {ref_diff:.2e} (mean |logp| {agreement['reference_logp_scale']:.1f}); "
          f"loss step 1 ours {lo[0]:.6f} TRL {lt[0]:.6f}; max |loss diff| over steps {max(loss_diffs):.2e}")

    per_step = None
    if args.per_step and not args.full_ft:
        po = run_ours(args, model_path, tok, rows, "adapter_disabled")
        pt = run_trl(args, model_path, tok, rows, precompute=False)
        so, st = summarize([po["step_s"]], args.warmup, args.batch), summarize([pt["step_s"]], args.warmup, args.batch)
        per_step = {"ours": {**so, "raw": po}, "trl": {**st, "raw": pt}, "ratio": so["pairs_per_s"] / st["pairs_per_s"],
                    "max_abs_loss_diff_over_steps": max(abs(a - b) for a, b in zip(po["losses"], pt["losses"]))}
        print(f"per-step reference (TRL's default; ours adapter_disabled): ours {so['pairs_per_s']:.2f} pairs/s, "
              f"TRL {st['pairs_per_s']:.2f} pairs/s: ratio {per_step['ratio']:.2f}x")
        load.mark("per-step variant")

    result = {
        "benchmark": "dpo step vs TRL DPOTrainer",
        "date": now(),
        "target": f"ours >= {TARGET}x TRL pairs/s (precomputed reference, same model, data, batch, settings)",
        "headline": {"ratio_pairs_per_s": ratio, "target_met": ratio >= TARGET,
                     "ratio_by_fastest_step": s_trl["step_s_min"] / s_ours["step_s_min"],
                     "ratio_by_mean_step": s_trl["step_s_mean"] / s_ours["step_s_mean"],
                     "ours_pairs_per_s": s_ours["pairs_per_s"], "trl_pairs_per_s": s_trl["pairs_per_s"],
                     "per_step_reference_ratio": per_step["ratio"] if per_step else None,
                     "deepspeed_engine_ratio": ratio_ds,
                     "first_step_loss_abs_diff": agreement["first_step_abs_diff"],
                     "max_abs_loss_diff_over_steps": agreement["max_abs_loss_diff_over_steps"]},
        "machine": {**machine(), "torch_threads": torch.get_num_threads()},
        "versions": versions("torch", "transformers", "trl", "peft", "accelerate", "datasets"),
        "config": {"model": args.model, "model_path": model_path, "lora": args.lora, "full_ft": args.full_ft,
                   "batch_pairs": args.batch, "sequences_per_forward": 2 * args.batch, "steps": args.steps,
                   "warmup": args.warmup, "rounds": args.rounds, "max_seq_len": args.max_seq_len, "lr": args.lr,
                   "lr_schedule": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0, "beta": args.beta,
                   "loss": "sigmoid, gamma 0 (no SFT term)", "dtype": "float32",
                   "trl_settings": "DPOConfig(precompute_ref_log_probs=True, gradient_checkpointing=False, bf16=False, "
                                   "use_cpu=True, train_sampling_strategy='sequential', optim='adamw_torch'); TRL's "
                                   "defaults are gradient_checkpointing=True, bf16=True, precompute_ref_log_probs=False",
                   "quick": args.quick},
        "seed": args.seed,
        "pairs": {**pair_info, "used": n,
                  "kinds_used": {k: sum(1 for r in rows if r["kind"] == k) for k in sorted({r["kind"] for r in rows})},
                  "tokens_prompt_plus_chosen": trl_ref["lengths"] if trl_ref else None},
        "timing": "per optimizer step, collated batch -> updated weights (forward, loss, backward, clip, AdamW, "
                  "zero_grad); TRL: Trainer on_step_begin -> on_step_end; first `warmup` steps of each run left out; "
                  "median over the timed steps of all rounds",
        "precomputed_reference": {"ours": s_ours, "trl": s_trl, "ratio": ratio,
                                  "ours_deepspeed_engine": s_ds, "ratio_deepspeed_engine": ratio_ds,
                                  "ours_reference_pass_s": ours_ref_s,
                                  "trl_init_s": [r["init_s"] for r in runs["trl"]],
                                  "trl_init_note": "DPOTrainer.__init__: tokenising the dataset + its reference pass"},
        "agreement": agreement,
        "per_step_reference": per_step,
        "runs": runs,
        "load": load.as_dict(),
    }
    path = write_result("dpo", result, key="quick" if args.quick else "full", out=args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
