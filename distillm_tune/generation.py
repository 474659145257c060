"""Token sampling and the rank-agreement rule shared by the decoder-only and T5 generators."""

import torch
import torch.distributed as dist


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=1.0, generator=None, greedy=False, uniforms=None):
    """Next ids ``[B]`` from logits ``[B, V]``: argmax when greedy or temperature == 0, else
    temperature -> top-k -> top-p (nucleus: keep the most likely tokens until their mass reaches
    top_p; HF's tie rule) -> a draw from the remaining distribution with ``generator`` (or with
    ``uniforms`` ``[B, 1]`` float64 in [0, 1) drawn by the caller)."""
    if greedy or temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        mass_above = probs.cumsum(-1) - probs  # probability of strictly better-ranked tokens
        sorted_logits = sorted_logits.masked_fill(mass_above >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    # Inverse-CDF sampling: one uniform draw per row. torch.multinomial on CPU draws one random
    # number per vocabulary entry (~10 ms a step at V = 50k, batch 8; benchmarks/bench_generation.py).
    # The running sum is float64 so rounding over 50k terms cannot move mass between tokens, and
    # right=True never lands on a zero-probability token.
    cdf = logits.softmax(-1, dtype=torch.float64).cumsum_(-1)
    u = uniforms if uniforms is not None else torch.rand((cdf.shape[0], 1), generator=generator, device=cdf.device,
                                                        dtype=torch.float64)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_max_(cdf.shape[-1] - 1).squeeze(-1)


def all_ranks_done(local_done: bool, device: torch.device, sync: bool = True) -> bool:
    """True once every rank is done. Under FSDP each forward all-gathers parameters, so a rank
    that stopped generating early would leave the others waiting forever: ranks stop together."""
    if not (sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return local_done
    running = torch.tensor([0 if local_done else 1], dtype=torch.int32, device=device)
    dist.all_reduce(running, op=dist.ReduceOp.MAX)
    return running.item() == 0
