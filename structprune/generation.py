"""Greedy text generation, to read a dense and a pruned model side by side on one prompt."""

from __future__ import annotations

import torch

DEFAULT_PROMPT = "The state of our Union is"


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, tokenizer, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 30,
                    device: str | torch.device = "cpu") -> str:
    """The prompt's greedy continuation (argmax at every step, no sampling: the same model gives
    the same text). Only the new text is returned. The model is used where it is (moved to
    `device` only if it is not there) and is not modified."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer (tiny demo models): nothing to generate")
    dev = torch.device(device)
    home = next(model.parameters()).device
    if home != dev:
        model = model.to(dev)
    try:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(dev)  # (1, P)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=tokenizer.eos_token_id)
    finally:
        if home != dev:
            model.to(home)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


__all__ = ["greedy_generate", "DEFAULT_PROMPT"]
