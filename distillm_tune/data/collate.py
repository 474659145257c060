"""Turning (prompt, response) token lists into training batches.

One format for every source a step can train on — the fixed dataset, fresh student-generated
outputs (SGO) and the replay buffer — so the recipe never branches on where a batch came from.
"""

from typing import Dict, List, Sequence

import torch

CROSS_ENTROPY_IGNORE_IDX = -100


def collate_prompt_response(
    samples: Sequence[Dict[str, List[int]]],
    pad_id: int,
    ignore_index: int = CROSS_ENTROPY_IGNORE_IDX,
) -> Dict[str, object]:
    """Right-pad ``{"prompt": ids, "response": ids}`` samples into a decoder-only batch.

    Returns ``tokens`` ``[B, S]`` (prompt + response, padded with ``pad_id``), ``labels`` ``[B, S]``
    already aligned with the logits (``labels[:, t]`` is the token that logits at position ``t``
    must predict, i.e. ``tokens[:, t + 1]``), with prompt positions, padding and the last position
    set to ``ignore_index``, and ``prompts``: the prompt id lists, for generation.
    The response keeps whatever EOS it carries; its EOS is a target like any other token.
    """
    if len(samples) == 0:
        raise ValueError("cannot collate an empty list of samples")
    seqs, lab_rows = [], []
    for i, s in enumerate(samples):
        prompt, response = list(s["prompt"]), list(s["response"])
        if len(prompt) == 0:
            raise ValueError(f"sample {i} has an empty prompt; at least one prompt token is needed")
        seq = prompt + response
        # labels[t] = seq[t + 1] where seq[t + 1] is a response token
        lab = [ignore_index] * (len(prompt) - 1) + response + [ignore_index]
        seqs.append(seq)
        lab_rows.append(lab)
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), ignore_index, dtype=torch.long)
    for i, (seq, lab) in enumerate(zip(seqs, lab_rows)):
        tokens[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
    return {
        "tokens": tokens,
        "labels": labels,
        "prompts": [list(s["prompt"]) for s in samples],
    }
