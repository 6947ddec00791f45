"""Chat-style generation with Hugging Face ``generate`` (the reference decode path)."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Generation:
    """Generated text with its token count and decode speed."""

    text: str
    new_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second, prefill included."""
        return self.new_tokens / max(self.seconds, 1e-9)


def chat_ids(tok, prompt: str) -> torch.Tensor:
    """Token ids of ``prompt`` as a user turn, with the chat template when the tokenizer has one."""
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                      add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt").input_ids
    return ids


def generate(model: nn.Module, tok, prompt: str, max_new_tokens: int = 64) -> Generation:
    """Greedy answer to ``prompt`` with HF ``generate``."""
    ids = chat_ids(tok, prompt)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    seconds = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    return Generation(tok.decode(new, skip_special_tokens=True).strip(), len(new), seconds)
