"""Synthesised rows -> training rows for the student: ``{id, prompt, completion, teacher_prompt}``.

Rendering happens with the *student's* chat template (the teacher that wrote the
rationale may be another model), so the same synthesised data trains any student.
SFT reads ``prompt``/``completion``; KALE also reads ``teacher_prompt`` (the same
question with the rationale in the input).
"""
from __future__ import annotations

import json
from pathlib import Path

from kale_ray.core.prompts import completion_text, render_chat, student_messages, teacher_view_messages
from kale_ray.runtime.generate import use_ray


def training_row(row: dict, tokenizer) -> dict:
    eos = tokenizer.eos_token or ""
    return {
        "id": row["id"],
        "prompt": render_chat(student_messages(row["question"], row.get("choices") or []), tokenizer),
        "teacher_prompt": render_chat(teacher_view_messages(row["question"], row.get("choices") or [], row["rationale"]), tokenizer),
        "completion": completion_text(row["answer"], eos),
        "num_hops": int(row.get("num_hops") or 0),
        "teacher": row.get("teacher", ""),
    }


def write_training_rows(synth_dir: str | Path, model_path: str, dest: str | Path, trust_remote_code: bool = False) -> dict:
    """Render every kept synthesised row into ``dest/part-<shard>.jsonl``; returns counts.

    One part per synthesis shard, rendered by Ray Data tasks when Ray is running (the driver sees
    only counts), else in this process. Parts of shards that no longer exist are removed, so the
    folder never mixes rows of another synthesis run.
    """
    synth_dir, dest = Path(synth_dir), Path(dest)
    data_dir = synth_dir / "data" if (synth_dir / "data").is_dir() else synth_dir
    files = sorted(data_dir.glob("shard-*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no synthesised shards (shard-*.jsonl) in {data_dir}")
    dest.mkdir(parents=True, exist_ok=True)
    jobs = [{"src": str(f), "dst": str(dest / f"part-{f.stem.removeprefix('shard-')}.jsonl")} for f in files]
    wanted = {Path(j["dst"]).name for j in jobs}
    for old in list(dest.glob("*.jsonl")):
        if old.name not in wanted:
            old.unlink()
    if use_ray("auto"):
        import ray

        ds = ray.data.from_items(jobs, override_num_blocks=len(jobs))
        counts = [int(r["rows"]) for r in ds.map_batches(_render_parts, batch_size=1, batch_format="numpy", num_cpus=1,
                                                          fn_kwargs={"model_path": model_path,
                                                                     "trust_remote_code": trust_remote_code}).iter_rows()]
    else:
        counts = [render_part(j["src"], j["dst"], model_path, trust_remote_code) for j in jobs]
    return {"rows": int(sum(counts)), "shards": len(files), "path": str(dest)}


_TOKENIZERS: dict = {}


def render_part(src: str, dst: str, model_path: str, trust_remote_code: bool = False) -> int:
    """One synthesis shard -> one file of training rows (atomic); returns its row count."""
    import os

    from kale_ray.models import load_tokenizer

    key = (model_path, trust_remote_code)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_tokenizer(model_path, trust_remote_code)
    tok = _TOKENIZERS[key]
    n = 0
    tmp = Path(dst).with_name(Path(dst).name + f".tmp{os.getpid()}")
    with tmp.open("w") as f:
        for line in Path(src).read_text().splitlines():
            if line.strip():
                f.write(json.dumps(training_row(json.loads(line), tok)) + "\n")
                n += 1
    tmp.replace(dst)
    return n


def _render_parts(batch, model_path: str, trust_remote_code: bool):
    import numpy as np

    rows = [render_part(str(s), str(d), model_path, trust_remote_code) for s, d in zip(batch["src"], batch["dst"])]
    return {"rows": np.array(rows, dtype=np.int64)}
