"""Left padding of id lists: the embedding positions are the last ones, so every sequence ends at the right
edge of the batch."""
from __future__ import annotations

import torch


def pad_token_id(tokenizer) -> int:
    """The id sequences are padded with: the tokenizer's pad token, or EOS when it has none (SmolLM2, Llama).
    Padded positions are masked out, so the choice never changes an embedding."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack id lists into [N, max_len] ids and attention mask, padding on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if seq:
            ids[i, width - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
            mask[i, width - len(seq):] = 1
    return ids, mask
