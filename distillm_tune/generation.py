"""Token sampling, the rank-agreement rule and CPU packed weights, shared by the decoder-only and T5
generators."""

import contextlib
import functools

import torch
import torch.distributed as dist
from torch import nn
from torchtune.modules import TiedLinear


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


def _mkl_packing_available() -> bool:
    try:
        return torch.backends.mkl.is_available() and callable(torch.ops.mkl._mkl_linear)
    except (AttributeError, RuntimeError):
        return False


def _packable(weight: torch.Tensor) -> bool:
    w = weight.detach()
    return type(w) is torch.Tensor and w.dtype == torch.float32 and w.device.type == "cpu"


def _packed_linear(packed: torch.Tensor, weight: torch.Tensor, bias, x: torch.Tensor) -> torch.Tensor:
    # the last argument is the row count the packed call is for: torch runs a plain F.linear when
    # it differs from the input's, so pass the input's (MKL's packed B serves any number of rows)
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, x.numel() // x.shape[-1])


@contextlib.contextmanager
def mkl_packed_linears(model: nn.Module, rows: int, enabled: bool = True):
    """For the duration, the model's fp32 CPU ``nn.Linear`` layers (and a torchtune ``TiedLinear``
    head) multiply with MKL-packed copies of their weights.

    Decoding multiplies a few rows by every weight matrix each step. On CPU, MKL's plain sgemm is
    slow at such shapes, and worst below 16 rows, where finished rows have left the batch (SmolLM2's
    49152 x 576 head: 10.5 ms at 8 rows, 9.5 ms at 16, 2 threads); with the weights packed once
    per call into MKL's internal layout the same products take 5.9 and 6.6 ms
    (benchmarks/bench_packed_linear.py, docs/benchmarks.md §2). The packed copies cost about the
    weights' size in extra memory for the call and are freed after it. Results equal ``F.linear``'s to float32 rounding (a different
    summation order; tests/test_generation.py).

    Left unchanged: other devices and dtypes, autocast (the packed op would bypass its bf16 cast),
    tensor subclasses (FSDP2's DTensor, torchao's quantized weights), layers that are not exactly
    ``nn.Linear`` (LoRA's keep their forward), torch builds without MKL, and ``enabled=False``.
    ``rows``: the batch rows of the decode steps, the row count MKL is asked to pack for.
    """
    if not enabled or not _mkl_packing_available() or torch.is_autocast_enabled("cpu"):
        yield
        return
    swapped, head = [], getattr(model, "output", None)
    try:
        with torch.no_grad():
            for m in model.modules():
                if type(m) is nn.Linear and _packable(m.weight) and (m.bias is None or _packable(m.bias)):
                    w = m.weight.detach()
                    packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
                    m.forward = functools.partial(_packed_linear, packed, w, m.bias)
                    swapped.append(m)
            if isinstance(head, TiedLinear) and _packable(head.tied_module.weight):
                w = head.tied_module.weight.detach()
                # torchtune's TiedLinear is a plain callable, not a module: a callable replaces it
                packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
                model.output = functools.partial(_packed_linear, packed, w, None)
        yield
    finally:
        for m in swapped:
            vars(m).pop("forward", None)
        if isinstance(head, TiedLinear):
            model.output = head
