"""Weight-only quantization of the frozen teacher through torchao (``teacher.quantization``).

The teacher is never trained, so quantizing its weights costs only the precision of its logits,
which the recipe's tests and ``benchmarks/bench_teacher_quantization.py`` measure. Only the
linear layers inside the transformer layers are quantized: the output head (the logits the
student is distilled on, and the weight the fused loss reads) and the embeddings stay as loaded.
"""

from typing import Iterable

import torch
from torch import nn

SCHEMES = ("int8_weight_only", "nf4")


def _layer_linears(model: nn.Module, layer_classes: tuple) -> Iterable[nn.Linear]:
    for layer in (m for m in model.modules() if isinstance(m, layer_classes)):
        yield from (m for m in layer.modules() if type(m) is nn.Linear)


NF4_BLOCK = 64  # values per NF4 scale (QLoRA's, torchao's default)


def _scaler_block(n_blocks: int) -> int:
    """torchao quantizes the per-block scales in groups that must divide their number: the
    largest divisor of ``n_blocks`` up to torchao's default 256 (SmolLM2's 576-wide layers
    have 5184 blocks, which 256 does not divide)."""
    return max(d for d in range(1, min(256, n_blocks) + 1) if n_blocks % d == 0)


def quantize_frozen(model: nn.Module, scheme: str, layer_classes: tuple) -> int:
    """Quantize the weights of the linear layers inside ``layer_classes`` modules in place;
    returns how many were quantized."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantization must be one of {list(SCHEMES)}, got {scheme!r}")
    linears = list(_layer_linears(model, layer_classes))
    if scheme == "int8_weight_only":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        targets = set(map(id, linears))
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: id(m) in targets)
    else:
        from torchao.dtypes.nf4tensor import to_nf4

        # torchao's NF4Tensor implements F.linear (dequantized per 64-value block)
        for linear in linears:
            weight = linear.weight.detach()
            if weight.numel() % NF4_BLOCK:
                raise ValueError(f"nf4 needs weights whose size is a multiple of {NF4_BLOCK}; a linear layer of "
                                 f"shape {tuple(weight.shape)} is not (use int8_weight_only)")
            linear.weight = nn.Parameter(
                to_nf4(weight, NF4_BLOCK, _scaler_block(weight.numel() // NF4_BLOCK)), requires_grad=False)
    return len(linears)


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage of a tensor, counting the inner tensors of torchao's quantized subclasses."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (shared ones once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t.data if isinstance(t, nn.Parameter) else t)
    return total
