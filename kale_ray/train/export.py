"""Write the trained model out: ``adapter/`` (PEFT, safetensors) and ``merged/`` (full HF model).

``merged/`` is a plain ``*ForCausalLM`` folder (safetensors + tokenizer) that transformers
and vLLM load directly. For LoRA it is made on rank 0 by reloading the base from disk,
loading the saved adapter and calling ``merge_and_unload()``, so it never depends on the
in-memory (possibly ZeRO-partitioned) training copy.

Under ZeRO-3 the parameters are partitioned across workers: the trainable ones (or all of
them without LoRA) are gathered with ``deepspeed.zero.GatheredParameters`` on *every* rank
(it is a collective) and rank 0 saves inside that context.
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from torch import nn


def _gathered(params: list[nn.Parameter], zero_stage: int):
    if zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _replace_dir(tmp: Path, dest: Path) -> None:
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def save_adapter(lm: nn.Module, adapter_dir: Path, rank: int, zero_stage: int) -> None:
    """Save the PEFT adapter of ``lm`` (call on every rank; rank 0 writes)."""
    trainable = [p for p in lm.parameters() if p.requires_grad]
    with _gathered(trainable, zero_stage):
        if rank == 0:
            tmp = adapter_dir.with_name(adapter_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            lm.save_pretrained(str(tmp), safe_serialization=True)
            _replace_dir(tmp, adapter_dir)


def save_full_model(lm: nn.Module, tokenizer: Any, merged_dir: Path, rank: int, zero_stage: int) -> None:
    """Save a fully fine-tuned model (call on every rank; rank 0 writes)."""
    with _gathered(list(lm.parameters()), zero_stage):
        if rank == 0:
            tmp = merged_dir.with_name(merged_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            lm.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            _replace_dir(tmp, merged_dir)


def merge_adapter(base_path: str, adapter_dir: Path, tokenizer: Any, merged_dir: Path, dtype: str = "float32") -> Path:
    """Base from disk + adapter -> ``merge_and_unload()`` -> ``merged_dir`` (rank 0 only)."""
    from peft import PeftModel

    from kale_ray.models import load_causal_lm

    base = load_causal_lm(base_path, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tmp = merged_dir.with_name(merged_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    _replace_dir(tmp, merged_dir)
    return merged_dir


def export_model(
    lm: nn.Module,
    tokenizer: Any,
    out_dir: Path,
    base_path: str,
    rank: int,
    zero_stage: int,
    lora: bool,
    save_merged: bool = True,
    dtype: str = "float32",
) -> tuple[Path | None, Path | None]:
    """``(adapter_dir or None, merged_dir or None)``; call on every rank."""
    out_dir = Path(out_dir)
    adapter_dir = out_dir / "adapter" if lora else None
    merged_dir = out_dir / "merged" if (save_merged or not lora) else None
    if lora:
        save_adapter(lm, adapter_dir, rank, zero_stage)
        if merged_dir is not None and rank == 0:
            merge_adapter(base_path, adapter_dir, tokenizer, merged_dir, dtype)
    else:
        save_full_model(lm, tokenizer, merged_dir, rank, zero_stage)
    return adapter_dir, merged_dir
