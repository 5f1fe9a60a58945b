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
    """Render every kept synthesised row into ``dest/train.jsonl``; returns counts."""
    from kale_ray.models import load_tokenizer

    synth_dir, dest = Path(synth_dir), Path(dest)
    data_dir = synth_dir / "data" if (synth_dir / "data").is_dir() else synth_dir
    files = sorted(data_dir.glob("shard-*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no synthesised shards (shard-*.jsonl) in {data_dir}")
    tok = load_tokenizer(model_path, trust_remote_code)
    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = dest / "train.jsonl.tmp"
    with tmp.open("w") as f:
        for path in files:
            for line in path.read_text().splitlines():
                if line.strip():
                    f.write(json.dumps(training_row(json.loads(line), tok)) + "\n")
                    n += 1
    tmp.replace(dest / "train.jsonl")
    return {"rows": n, "shards": len(files), "path": str(dest / "train.jsonl")}
