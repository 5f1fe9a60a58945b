"""Logits at the answer positions only: decoder body -> select positions -> ``lm_head``.

A causal LM's ``forward`` materialises ``(B, T, V)`` logits; with a 49k vocabulary and
mostly-prompt sequences that is the largest tensor of the step, and almost all of it is
thrown away (the loss only looks at the answer tokens). :class:`AnswerLogits` runs the
decoder to the last hidden states ``(B, T, H)``, keeps the ``N`` positions that predict an
answer token (:func:`kale_ray.core.losses.select_positions`) and applies ``lm_head`` to
those: ``(N, V)``.

It is an ``nn.Module`` wrapping the LM (plain HF or PEFT/LoRA) and is the module handed to
``deepspeed.initialize``: DeepSpeed's forward hooks (ZeRO-3 parameter gathering) then fire
on the root module exactly as for an ordinary ``engine(batch)`` call.

Pure torch: imports no Ray or DeepSpeed.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kale_ray.core.losses import IGNORE_INDEX, select_positions


def base_causal_lm(lm: nn.Module) -> nn.Module:
    """The underlying ``*ForCausalLM`` of a PEFT-wrapped or plain model.

    With LoRA, PEFT injects its layers *into* this model, so calling its decoder runs the
    adapters too. (Prompt-learning PEFT types, which change the inputs, are not supported.)
    """
    get_base = getattr(lm, "get_base_model", None)
    return get_base() if callable(get_base) else lm


def decoder_and_head(lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(decoder body, lm_head)`` of a causal LM (Llama, Qwen, Mistral, SmolLM, ...)."""
    base = base_causal_lm(lm)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model")
    head = base.get_output_embeddings()
    if decoder is None or head is None:
        raise TypeError(f"{type(base).__name__}: cannot find the decoder body and lm_head")
    return decoder, head


class AnswerLogits(nn.Module):
    """``forward(input_ids, attention_mask, labels)`` -> ``(logits (N, V), targets (N,))``.

    ``output="hidden"`` returns the last hidden states ``(B, T, H)`` instead (for losses that
    pool representations, e.g. a contrastive loss). The row of each selected position is
    ``(labels[:, 1:] != -100).nonzero()[:, 0]`` (row-major order), for per-sequence sums.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output: str = "answer_logits",
    ) -> Any:
        decoder, head = decoder_and_head(self.lm)
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = out.last_hidden_state  # (B, T, H)
        if output == "hidden":
            return hidden
        if output != "answer_logits":
            raise ValueError(f"unknown output {output!r}; expected 'answer_logits' or 'hidden'")
        if labels is None:
            raise ValueError("labels are needed to select the answer positions")
        h_sel, targets = select_positions(hidden, labels, IGNORE_INDEX)  # (N, H), (N,)
        logits = head(h_sel)  # (N, V)
        # Gemma-2-style soft-capping lives in the CausalLM forward that we bypass; redo it here.
        cap = getattr(base_causal_lm(self.lm).config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits, targets
