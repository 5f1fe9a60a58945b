"""Generation throughput: the synthesis path (Ray Data + ray.data.llm + vLLM) vs bare
``vllm.LLM.generate`` vs batched Hugging Face ``generate``, same prompts and greedy settings.

    python benchmarks/bench_generation.py            # SmolLM2-135M, 128 prompts x 64 tokens
    python benchmarks/bench_generation.py --quick    # tiny Llama, 32 prompts x 16 tokens

Prints output tokens/s of each and the ratios (targets: pipeline >= 0.9x bare vLLM, >= 3x HF),
writes benchmarks/results/generation.json. Each engine's start-up is timed apart from its
generation; the ratios compare generation only, and the JSON keeps both. Runs one after
another in this process (vLLM first, then the pipeline, then HF) so they never share the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Load, machine, now  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "generation.json"


def prompts_for(n: int, tok) -> list[str]:
    from kale_ray.core.kg import load_kg
    from kale_ray.core.prompts import render_chat, rationale_request_messages
    from kale_ray.core.qa import generate_questions

    kg = load_kg("builtin:umls")
    qs = generate_questions(kg, n, [2, 3], num_choices=4, max_answers=3, seed=0)
    out = []
    for q in qs[:n]:
        facts = [f"{kg.entity_name(h)} {r.replace('_', ' ')} {kg.entity_name(t)}" for h, r, t in q.hops]
        out.append(render_chat(rationale_request_messages(q.question, q.answer, facts, q.choices), tok))
    return out


def gen_config(max_tokens: int):
    from kale_ray.config import GenerationConfig

    return GenerationConfig(max_tokens=max_tokens, batch_size=32, temperature=0.0, ignore_eos=True)


def bare_vllm(model: str, prompts: list[str], max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    from kale_ray.runtime.llm import engine_kwargs, sampling_params

    gen = gen_config(max_tokens)
    t = time.perf_counter()
    llm = LLM(model=model, **engine_kwargs(gen, 1024))  # the same engine settings the pipeline uses
    start = time.perf_counter() - t
    sp = SamplingParams(**sampling_params(gen))
    t = time.perf_counter()
    outs = llm.generate(prompts, sp)
    gen = time.perf_counter() - t
    toks = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm, outs
    import gc

    gc.collect()  # the engine core process goes with the LLM object; the next engine must not share the CPU with it
    return {"startup_s": start, "generate_s": gen, "output_tokens": toks, "tokens_per_s": toks / gen}


def pipeline(model: str, prompts: list[str], max_tokens: int) -> dict:
    import ray

    from kale_ray.runtime.llm import build_vllm_processor

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    gen = gen_config(max_tokens)
    proc = build_vllm_processor(model, gen, 1024)
    # warm-up dataset of 1 row measures engine start; then the timed run reuses nothing
    # (ray.data.llm starts a fresh engine per dataset execution), so report total and
    # total minus the measured start-up.
    t = time.perf_counter()
    list(proc(ray.data.from_items([{"prompt": prompts[0]}])).iter_rows())
    warm = time.perf_counter() - t
    ds = ray.data.from_items([{"prompt": p} for p in prompts])
    t = time.perf_counter()
    rows = list(proc(ds).iter_rows())
    total = time.perf_counter() - t
    toks = sum(int(r.get("gen_tokens") or 0) for r in rows)
    ray.shutdown()
    gen_s = max(1e-6, total - warm)
    return {"startup_s": warm, "total_s": total, "generate_s": gen_s, "output_tokens": toks, "tokens_per_s": toks / gen_s,
            "note": "generate_s = end-to-end time of the run minus a 1-row run's time (engine start + pipeline set-up)"}


def hf_generate(model: str, prompts: list[str], max_tokens: int, batch: int = 16) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    t = time.perf_counter()
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    start = time.perf_counter() - t
    toks = 0
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            enc = tok(prompts[i: i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            out = lm.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id)
            toks += int((out[:, enc["input_ids"].shape[1]:] != -1).sum())
    gen = time.perf_counter() - t
    return {"startup_s": start, "generate_s": gen, "output_tokens": toks, "tokens_per_s": toks / gen, "batch_size": batch}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=0,
                    help="give every engine N threads: OMP_NUM_THREADS=N and VLLM_CPU_OMP_THREADS_BIND=nobind "
                         "(inherited by the local Ray cluster's workers), torch.set_num_threads(N) for HF. "
                         "0: each tool's own default (vLLM CPU binds N-1 cores and reserves one; Ray gives a 1-CPU "
                         "actor OMP_NUM_THREADS=1; torch uses every core)")
    ap.add_argument("--out", default=None, help=f"result file (default {OUT})")
    args = ap.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
        import torch

        torch.set_num_threads(args.threads)
    from kale_ray.models import load_tokenizer, resolve_model

    model = resolve_model("builtin:tiny-llama" if args.quick else "builtin:smollm2-135m")
    n = args.prompts or (32 if args.quick else 128)
    mt = args.max_tokens or (16 if args.quick else 64)
    prompts = prompts_for(n, load_tokenizer(model))
    load = Load()
    res = {"bare_vllm": bare_vllm(model, prompts, mt)}
    load.mark("after bare vLLM")
    res["pipeline"] = pipeline(model, prompts, mt)
    load.mark("after pipeline")
    res["hf_generate"] = hf_generate(model, prompts, mt)
    ratios = {
        "pipeline_over_bare_vllm": res["pipeline"]["tokens_per_s"] / res["bare_vllm"]["tokens_per_s"],
        "pipeline_over_hf_generate": res["pipeline"]["tokens_per_s"] / res["hf_generate"]["tokens_per_s"],
        "bare_vllm_over_hf_generate": res["bare_vllm"]["tokens_per_s"] / res["hf_generate"]["tokens_per_s"],
    }
    import torch, transformers, vllm, ray  # noqa: E401

    out = {
        "benchmark": "generation throughput", "target": "pipeline >= 0.9x bare vLLM, >= 3x HF generate",
        "date": now(),
        "machine": {**machine(), "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "vllm": vllm.__version__,
                     "ray": ray.__version__},
        "config": {"model": model, "prompts": n, "max_tokens": mt, "greedy": True, "ignore_eos": "vllm: yes; hf: min_new_tokens",
                   "quick": args.quick, "hf_batch_size": res["hf_generate"]["batch_size"],
                   "threads": args.threads or "each tool's default",
                   "thread_notes": "default: bare vLLM CPU binds its engine to N-1 cores and reserves one "
                                   "(1 thread on 2 cores, 'Reducing Torch threads from 2 to 1'); the pipeline's "
                                   "engine runs in a Ray actor with VLLM_CPU_OMP_THREADS_BIND=nobind and Ray's "
                                   "OMP_NUM_THREADS for a 1-CPU actor; HF generate uses torch's default (all cores)"},
        "seed": 0, "results": res, "ratios": ratios, "load": load.as_dict(),
    }
    dest = Path(args.out) if args.out else OUT
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(out, indent=2))
    for k, v in res.items():
        print(f"{k:12s} {v['tokens_per_s']:8.1f} output tok/s  (start-up {v['startup_s']:.1f}s, generate {v['generate_s']:.1f}s)")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")


if __name__ == "__main__":  # vLLM spawns its engine process
    main()
