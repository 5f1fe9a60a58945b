"""KA loss cost: the project's answer-positions-only path vs a naive full-vocabulary one.

Both variants compute KALE's loss ``CE(student, y) + lam * KL(teacher || student)`` over the
answer tokens for the same model and batch; the teacher (the same model, with the rationale
in its input) runs under ``torch.no_grad`` in both (stop-gradient teacher).

* ``project``: ``decoder(ids) -> hidden (B, T, H) -> select_positions -> lm_head on the N
  answer positions -> ka_loss`` (logits ``(N, V)`` for student and teacher).
* ``naive``: ``model(ids).logits`` materialises ``(B, T, V)`` for the student *and* the
  teacher input, full-vocabulary ``log_softmax`` of both, then the masked CE/KL at the
  answer positions.

What is measured
* step time: wall time of one training step's forward + backward (student backbone with
  grad, teacher backbone without, head, loss, ``loss.backward()``); median of ``--repeats``
  after ``--warmup`` runs. Also the loss part alone (from fixed hidden states: head + loss +
  backward to the hidden states and the head weight).
* peak memory: with ``torch.profiler.profile(profile_memory=True, record_shapes=True,
  with_stack=True)`` every CPU tensor allocation/free made by torch inside the region is
  recorded; the peak of the running sum of live bytes (tensors that existed before the
  region, e.g. weights and the input hidden states, are not counted) is reported. Measured
  for the loss part (the target) and for the whole step. It counts torch tensors only (not
  Python objects, not allocator caching), so it is exact for what each variant allocates.
* agreement: loss and gradients (hidden states, head weight) of the two variants on the
  same hidden states, max abs difference.

Run: ``python benchmarks/bench_ka_loss.py [--quick]``; writes ``benchmarks/results/ka_loss.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from kale_ray.core.losses import IGNORE_INDEX, ka_loss, select_positions

RESULTS = Path(__file__).resolve().parent / "results" / "ka_loss.json"


# --------------------------------------------------------------------------- batch


def make_batch(vocab: int, batch: int, teacher_prompt: int, student_prompt: int, answer: int, seed: int) -> dict:
    """Random token ids, right-padded; prompt lengths vary +-10% per row; the answer tokens
    (the same for the student and the teacher input) follow the prompt. labels = -100 except
    the answer tokens."""
    g = torch.Generator().manual_seed(seed)

    def build(prompt_len: int, answers: torch.Tensor):
        lo, hi = int(prompt_len * 0.9), int(prompt_len * 1.1) + 1
        lens = torch.randint(lo, hi, (batch,), generator=g)
        t = int(lens.max()) + answer
        ids = torch.zeros(batch, t, dtype=torch.long)
        attn = torch.zeros(batch, t, dtype=torch.long)
        labels = torch.full((batch, t), IGNORE_INDEX, dtype=torch.long)
        for b in range(batch):
            n = int(lens[b])
            ids[b, :n] = torch.randint(0, vocab, (n,), generator=g)
            ids[b, n : n + answer] = answers[b]
            labels[b, n : n + answer] = answers[b]
            attn[b, : n + answer] = 1
        return ids, attn, labels

    answers = torch.randint(0, vocab, (batch, answer), generator=g)
    t_ids, t_attn, t_labels = build(teacher_prompt, answers)
    s_ids, s_attn, s_labels = build(student_prompt, answers)
    return dict(t_ids=t_ids, t_attn=t_attn, t_labels=t_labels, s_ids=s_ids, s_attn=s_attn, s_labels=s_labels)


# --------------------------------------------------------------------------- the two loss paths


def project_loss(h_s, h_t, s_labels, t_labels, head, lam, temperature):
    """hidden -> select_positions -> lm_head on the N answer positions -> ka_loss."""
    hs_sel, targets = select_positions(h_s, s_labels)  # (N, H), (N,)
    with torch.no_grad():
        ht_sel, t_targets = select_positions(h_t, t_labels)
        teacher_logits = head(ht_sel)  # (N, V)
    if not torch.equal(targets, t_targets):
        raise RuntimeError("student and teacher answer tokens differ")
    student_logits = head(hs_sel)  # (N, V)
    loss, _ = ka_loss(student_logits, teacher_logits, targets, lam=lam, temperature=temperature)
    return loss


def naive_loss(s_logits, t_logits, s_labels, t_labels, lam, temperature):
    """Full (B, T, V) logits of both inputs; full log_softmax; masked CE + KL at the answers."""
    s_mask = s_labels[:, 1:] != IGNORE_INDEX  # (B, Ts-1)
    t_mask = t_labels[:, 1:] != IGNORE_INDEX  # (B, Tt-1)
    s_logp = F.log_softmax(s_logits[:, :-1].float() / temperature, dim=-1)  # (B, Ts-1, V)
    s_logp_ce = s_logp if temperature == 1 else F.log_softmax(s_logits[:, :-1].float(), dim=-1)  # (B, Ts-1, V)
    with torch.no_grad():
        t_logp = F.log_softmax(t_logits[:, :-1].float() / temperature, dim=-1)  # (B, Tt-1, V)
    targets = s_labels[:, 1:].clamp(min=0)  # (B, Ts-1)
    ce_tok = -s_logp_ce.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, Ts-1)
    ce = (ce_tok * s_mask).sum() / s_mask.sum()
    kl_tok = (t_logp[t_mask].exp() * (t_logp[t_mask] - s_logp[s_mask])).sum(-1)  # (N,)
    kl = kl_tok.sum() * temperature**2 / s_mask.sum()
    return ce + lam * kl


# --------------------------------------------------------------------------- steps


def step_project(model, batch, lam, temperature):
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    with torch.no_grad():
        h_t = decoder(input_ids=batch["t_ids"], attention_mask=batch["t_attn"]).last_hidden_state
    h_s = decoder(input_ids=batch["s_ids"], attention_mask=batch["s_attn"]).last_hidden_state
    loss = project_loss(h_s, h_t, batch["s_labels"], batch["t_labels"], head, lam, temperature)
    loss.backward()
    return loss.detach()


def step_naive(model, batch, lam, temperature):
    with torch.no_grad():
        t_logits = model(input_ids=batch["t_ids"], attention_mask=batch["t_attn"]).logits
    s_logits = model(input_ids=batch["s_ids"], attention_mask=batch["s_attn"]).logits
    loss = naive_loss(s_logits, t_logits, batch["s_labels"], batch["t_labels"], lam, temperature)
    loss.backward()
    return loss.detach()


def loss_part(variant, h_s, h_t, batch, head, lam, temperature):
    """The loss part alone: from fixed hidden states, head + loss + backward."""
    if variant == "project":
        loss = project_loss(h_s, h_t, batch["s_labels"], batch["t_labels"], head, lam, temperature)
    else:
        s_logits = head(h_s)  # (B, Ts, V)
        with torch.no_grad():
            t_logits = head(h_t)  # (B, Tt, V)
        loss = naive_loss(s_logits, t_logits, batch["s_labels"], batch["t_labels"], lam, temperature)
    loss.backward()
    return loss.detach()


# --------------------------------------------------------------------------- measurement


def peak_bytes(fn) -> int:
    """Peak of live bytes allocated by torch (CPU) inside ``fn``, from the profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def timed_interleaved(fn, variants, warmup: int, repeats: int) -> dict[str, list[float]]:
    """``fn(variant)`` timed ``repeats`` times per variant after ``warmup`` untimed rounds;
    the order alternates each round (A B, B A, ...)."""
    out: dict[str, list[float]] = {v: [] for v in variants}
    for i in range(warmup + repeats):
        order = variants if i % 2 == 0 else tuple(reversed(variants))
        for v in order:
            t0 = time.perf_counter()
            fn(v)
            dt = time.perf_counter() - t0
            if i >= warmup:
                out[v].append(dt)
    return out


def mib(x: float) -> float:
    return round(x / 2**20, 2)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="builtin:tiny-llama, smaller batch, fewer repeats")
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--teacher-prompt", type=int, default=200)
    ap.add_argument("--student-prompt", type=int, default=80)
    ap.add_argument("--answer", type=int, default=8)
    ap.add_argument("--lam", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--loss-repeats", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.quick:
        args.model = args.model or "builtin:tiny-llama"
        args.repeats = min(args.repeats, 3)
    args.model = args.model or "builtin:smollm2-135m"
    if args.threads:
        torch.set_num_threads(args.threads)

    from kale_ray.models import load_causal_lm, resolve_model

    torch.manual_seed(args.seed)
    model = load_causal_lm(resolve_model(args.model))
    model.train()  # no dropout in Llama; train() for honesty
    cfg = model.config
    vocab = cfg.vocab_size
    batch = make_batch(vocab, args.batch, args.teacher_prompt, args.student_prompt, args.answer, args.seed)
    n_tok = int((batch["s_labels"][:, 1:] != IGNORE_INDEX).sum())
    b, ts = batch["s_ids"].shape
    tt = batch["t_ids"].shape[1]
    print(f"model {args.model}: vocab {vocab}, hidden {cfg.hidden_size}, layers {cfg.num_hidden_layers}")
    print(f"batch B={b}, student T={ts}, teacher T={tt}, answer tokens N={n_tok}, threads {torch.get_num_threads()}")

    lam, temp = args.lam, args.temperature
    head = model.get_output_embeddings()

    # -- agreement, on the same hidden states
    decoder = model.get_decoder()
    with torch.no_grad():
        h_s0 = decoder(input_ids=batch["s_ids"], attention_mask=batch["s_attn"]).last_hidden_state
        h_t0 = decoder(input_ids=batch["t_ids"], attention_mask=batch["t_attn"]).last_hidden_state
    grads = {}
    losses = {}
    for variant in ("project", "naive"):
        model.zero_grad(set_to_none=True)
        h_s = h_s0.clone().requires_grad_()
        losses[variant] = loss_part(variant, h_s, h_t0, batch, head, lam, temp).item()
        grads[variant] = (h_s.grad.clone(), head.weight.grad.clone())
    agreement = {
        "loss_project": losses["project"],
        "loss_naive": losses["naive"],
        "loss_abs_diff": abs(losses["project"] - losses["naive"]),
        "grad_hidden_max_abs_diff": (grads["project"][0] - grads["naive"][0]).abs().max().item(),
        "grad_head_max_abs_diff": (grads["project"][1] - grads["naive"][1]).abs().max().item(),
    }
    print(f"loss project {losses['project']:.6f} naive {losses['naive']:.6f} |diff| {agreement['loss_abs_diff']:.2e}; "
          f"max |grad diff| hidden {agreement['grad_hidden_max_abs_diff']:.2e} head {agreement['grad_head_max_abs_diff']:.2e}")

    def run_step(variant):
        model.zero_grad(set_to_none=True)
        (step_project if variant == "project" else step_naive)(model, batch, lam, temp)

    def run_loss(variant):
        model.zero_grad(set_to_none=True)
        loss_part(variant, h_s0.clone().requires_grad_(), h_t0, batch, head, lam, temp)

    variants = ("project", "naive")
    # interleaved (ABBA...) so that load from other processes hits both variants alike
    loss_times = timed_interleaved(run_loss, variants, args.warmup, args.loss_repeats)
    step_times = timed_interleaved(run_step, variants, args.warmup, args.repeats)
    results = {}
    for variant in variants:
        model.zero_grad(set_to_none=True)
        loss_peak = peak_bytes(lambda: run_loss(variant))
        model.zero_grad(set_to_none=True)
        step_peak = peak_bytes(lambda: run_step(variant))
        if variant == "project":
            logits_bytes = 2 * n_tok * vocab * 4
        else:
            logits_bytes = (b * ts + b * tt) * vocab * 4
        results[variant] = {
            "step_s_median": statistics.median(step_times[variant]),
            "step_s_min": min(step_times[variant]),
            "step_s_raw": step_times[variant],
            "loss_part_s_median": statistics.median(loss_times[variant]),
            "loss_part_s_min": min(loss_times[variant]),
            "loss_part_s_raw": loss_times[variant],
            "loss_part_peak_bytes": loss_peak,
            "step_peak_bytes": step_peak,
            "logits_bytes_fp32": logits_bytes,
        }
        r = results[variant]
        print(f"{variant:8s} step {r['step_s_median']:.3f} s (min {r['step_s_min']:.3f})  "
              f"loss part {r['loss_part_s_median'] * 1e3:.1f} ms (min {r['loss_part_s_min'] * 1e3:.1f})  "
              f"loss peak {mib(loss_peak)} MiB  step peak {mib(step_peak)} MiB  logits {mib(logits_bytes)} MiB")

    p, n = results["project"], results["naive"]
    ratios = {
        "loss_part_peak_memory": p["loss_part_peak_bytes"] / n["loss_part_peak_bytes"],
        "step_peak_memory": p["step_peak_bytes"] / n["step_peak_bytes"],
        "step_time": p["step_s_median"] / n["step_s_median"],
        "loss_part_time": p["loss_part_s_median"] / n["loss_part_s_median"],
    }
    target_met = ratios["loss_part_peak_memory"] <= 0.5 and ratios["step_time"] <= 1.05
    print("ratios project / naive: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print(f"target (loss peak memory <= 0.5x naive, step time <= 1.05x): {'met' if target_met else 'NOT met'}")

    import transformers

    out = {
        "benchmark": "ka_loss",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "config": {
            "model": args.model, "vocab": vocab, "hidden": cfg.hidden_size, "layers": cfg.num_hidden_layers,
            "batch": b, "student_T": ts, "teacher_T": tt, "answer_tokens_N": n_tok,
            "teacher_prompt": args.teacher_prompt, "student_prompt": args.student_prompt, "answer": args.answer,
            "lam": lam, "temperature": temp, "direction": "forward", "dtype": "float32",
            "warmup": args.warmup, "repeats": args.repeats, "loss_repeats": args.loss_repeats,
            "quick": args.quick,
        },
        "seed": args.seed,
        "measures": {
            "step_s": "wall time of forward (student with grad, teacher no_grad) + loss + backward; "
                      "median and min over repeats, variants interleaved",
            "loss_part_s": "head + loss + backward from fixed hidden states; median and min, interleaved",
            "peak_bytes": "peak of live torch CPU tensor bytes allocated inside the region "
                          "(torch.profiler memory timeline; pre-existing tensors excluded)",
            "logits_bytes_fp32": "size of the materialised student + teacher logits",
        },
        "agreement": agreement,
        "results": results,
        "ratios_project_over_naive": ratios,
        "target_met": target_met,
    }
    # one file, one entry per mode: a quick run does not overwrite the full one
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {}
    if path.exists():
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError:
            doc = {}
    doc["quick" if args.quick else "full"] = out
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
