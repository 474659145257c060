"""Loss interoperability with torchtune, both ways.

**torchtune's KD losses in our recipe.** ``kd_offpolicy`` calls its divergence through the
``Divergence`` interface (``sum_and_count``, ``value_and_grad``, the fused path), which torchtune's
``torchtune.modules.loss`` classes do not have. ``adapt_loss_config`` maps each of them, at setup,
to the divergence of this package with the same math and arguments (``TORCHTUNE_KD_LOSSES``), and
refuses, naming ``loss._component_``, any component that is not a teacher–student divergence.

torchtune's ``ForwardKLLoss`` is not KL(p ‖ q) but the cross-entropy with the teacher's
distribution, −Σ p log q = KL(p ‖ q) + H(p): the same gradient as our ``ForwardKLLoss``, a value
larger by the teacher's entropy. Its adaptation, ``TorchtuneForwardKLLoss``, keeps torchtune's
value, so a run logs what torchtune's own recipe would; ``TorchtuneSymmetricKLLoss`` mixes it
with reverse KL as torchtune's ``SymmetricKLLoss`` does.

**Our divergences in torchtune's recipe.** torchtune's ``knowledge_distillation_single_device``
calls ``kd_loss(student_chunks, teacher_chunks, labels)`` and asserts that ``kd_loss`` has the
``num_output_chunks`` of its ``CEWithChunkedOutputLoss``. ``<Name>WithChunkedOutputLoss`` (one
per entry of ``DIVERGENCES``, in ``KD_RECIPE_LOSSES``) is that: a divergence module of this
package and a ``num_output_chunks`` attribute; the math is the divergence's own.
"""

import inspect
from typing import Any, Dict, Optional, Tuple, Type

from torch import Tensor, nn

from distillm_tune.losses import _math
from distillm_tune.losses.contrastive import DistiLLM2Loss
from distillm_tune.losses.divergences import (
    DIVERGENCES,
    Divergence,
    ForwardKLLoss,
    InterpolatedSkewKLLoss,
    JSDLoss,
    Logits,
    ReverseKLLoss,
    SkewForwardKLLoss,
    SkewReverseKLLoss,
    TVDLoss,
)

# --------------------------------------------------------------- torchtune's losses, adapted


class TorchtuneForwardKLLoss(Divergence):
    """torchtune's ``ForwardKLLoss``: −Σ p log q = KL(p ‖ q) + H(p) (teacher p, student q).

    Same gradient as ``ForwardKLLoss``; the value includes the teacher's entropy, as torchtune's.
    """

    def per_token(self, log_q: Tensor, log_p: Tensor) -> Tuple[Tensor, Tensor]:
        return _math.soft_cross_entropy(log_q, log_p)


class TorchtuneSymmetricKLLoss(Divergence):
    """torchtune's ``SymmetricKLLoss``: r · (−Σ p log q) + (1 − r) · KL(q ‖ p), r = ``sym_kd_ratio``."""

    def __init__(self, sym_kd_ratio: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= float(sym_kd_ratio) <= 1.0:
            raise ValueError(f"sym_kd_ratio must lie in [0, 1], got {sym_kd_ratio!r}")
        self.sym_kd_ratio = float(sym_kd_ratio)

    def per_token(self, log_q: Tensor, log_p: Tensor) -> Tuple[Tensor, Tensor]:
        r = self.sym_kd_ratio
        v1, g1 = _math.soft_cross_entropy(log_q, log_p)
        v2, g2 = _math.reverse_kl(log_q, log_p)
        return r * v1 + (1.0 - r) * v2, r * g1 + (1.0 - r) * g2


_TT = "torchtune.modules.loss."
# torchtune class path -> our divergence with the same math. Arguments keep their names, except
# num_output_chunks: kd_offpolicy chunks the logits by its own top-level num_output_chunks and
# its divergences take any chunking.
TORCHTUNE_KD_LOSSES: Dict[str, Type[Divergence]] = {
    _TT + "ForwardKLLoss": TorchtuneForwardKLLoss,
    _TT + "ForwardKLWithChunkedOutputLoss": TorchtuneForwardKLLoss,
    _TT + "ReverseKLLoss": ReverseKLLoss,
    _TT + "ReverseKLWithChunkedOutputLoss": ReverseKLLoss,
    _TT + "SymmetricKLLoss": TorchtuneSymmetricKLLoss,
    _TT + "SymmetricKLWithChunkedOutputLoss": TorchtuneSymmetricKLLoss,
}

# torchtune losses that are not teacher-student divergences, and why
TORCHTUNE_REFUSED = {
    _TT + "CEWithChunkedOutputLoss": (
        "cross-entropy is kd_ratio's other term: the recipe already adds (1 - kd_ratio) x the "
        "student's cross-entropy on the labels; set kd_ratio below 1 instead"
    ),
}


def _refuse(key: str, message: str) -> ValueError:
    return ValueError(f"config {key}: {message}")


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _torchtune_name(obj: Any) -> Optional[str]:
    """The public ``torchtune.modules.loss.X`` path of a torchtune loss class, if it is one."""
    import torchtune.modules.loss as tt_loss

    name = getattr(obj, "__name__", None)
    if name and getattr(tt_loss, name, None) is obj:
        return _TT + name
    return None


def adapt_loss_config(loss_cfg: Dict[str, Any]) -> Tuple[Dict[str, Any], Optional[str]]:
    """``(config of a Divergence, message)``: a torchtune KD loss's config becomes the config of
    our divergence with the same math (``message`` says which); any other ``Divergence`` is
    returned as is (``message`` None). Everything else raises ``ValueError`` naming the key.

    Only the class is looked up; nothing is instantiated and no model is needed.
    """
    from torchtune.config._utils import _get_component_from_path

    path = loss_cfg.get("_component_")
    try:
        component = _get_component_from_path(path)
    except Exception as e:  # noqa: BLE001 - torchtune raises InstantiationError, ValueError, ...
        raise _refuse("loss._component_", f"{path!r} cannot be imported: {e}") from None
    if inspect.isclass(component) and issubclass(component, (Divergence, DistiLLM2Loss)):
        return loss_cfg, None  # ours (the recipe checks that DistiLLM2Loss goes with method=distillm2)
    tt_name = _torchtune_name(component)
    if tt_name in TORCHTUNE_REFUSED:
        raise _refuse("loss._component_", f"{path} ({_qualname(component)}) is not a teacher-student "
                      f"divergence: {TORCHTUNE_REFUSED[tt_name]}")
    if tt_name in TORCHTUNE_KD_LOSSES:
        ours = TORCHTUNE_KD_LOSSES[tt_name]
        accepted = set(inspect.signature(component.__init__).parameters) - {"self"}
        kwargs, dropped = {}, []
        for key, value in loss_cfg.items():
            if key == "_component_":
                continue
            if key == "vocab_size":  # set by the recipe for padded embedding tables
                kwargs[key] = value
            elif key not in accepted:
                raise _refuse(f"loss.{key}", f"{key}={value!r} is not an argument of {path} "
                              f"(it takes {sorted(accepted)}); for more options use one of "
                              f"distillm_tune.losses {sorted(c.__name__ for c in DIVERGENCES.values())}")
            elif key == "num_output_chunks":
                dropped.append(f"{key}={value}")
            else:
                kwargs[key] = value
        adapted = {"_component_": f"{ours.__module__}.{ours.__qualname__}", **kwargs}
        message = (f"loss._component_={path}: adapted to {adapted['_component_']} (same math"
                   + (", with torchtune's value -sum p log q = KL(p||q) + H(p)" if ours in
                      (TorchtuneForwardKLLoss, TorchtuneSymmetricKLLoss) else "")
                   + f"), arguments {kwargs}"
                   + (f"; {', '.join(dropped)} not used: the recipe's num_output_chunks chunks the logits"
                      if dropped else ""))
        return adapted, message
    if inspect.isclass(component):
        where = "torchtune loss" if _torchtune_name(component) or path.startswith("torchtune.") else "class"
        raise _refuse("loss._component_", f"{path} ({_qualname(component)}, a {where}) is not a "
                      "teacher-student divergence: the recipe needs a distillm_tune.losses.Divergence "
                      f"(one of {sorted(c.__name__ for c in DIVERGENCES.values())}) or one of torchtune's "
                      f"KD losses {sorted(n[len(_TT):] for n in TORCHTUNE_KD_LOSSES)}")
    return loss_cfg, None  # a factory: what it builds is checked once built


# --------------------------------------------------------- our divergences as torchtune's kd_loss


class ChunkedOutputKDLoss(nn.Module):
    """Base of the ``kd_loss`` components for torchtune's KD recipes.

    ``forward(student_logits, teacher_logits, labels)``: lists of ``[B, S/k, V]`` chunks and
    ``[B, S]`` labels (or ``[N, V]`` logits and ``[N]`` labels), as torchtune passes them; returns
    ``divergence(...)``, the token mean over labels other than ``ignore_index``.

    Args:
        num_output_chunks: the chunk count the recipe checks against its ``loss`` (its
            ``CEWithChunkedOutputLoss``'s, 8 by default); any chunking is computed alike.
        **kwargs: the divergence's arguments (``alpha``, ``beta``, ``temperature``,
            ``ignore_index``, ``vocab_size``).
    """

    divergence_cls: Type[Divergence] = Divergence

    def __init__(self, num_output_chunks: int = 8, **kwargs):
        super().__init__()
        self.num_output_chunks = int(num_output_chunks)
        self.divergence = self.divergence_cls(**kwargs)
        self.ignore_index = self.divergence.ignore_index

    def forward(self, student_logits: Logits, teacher_logits: Logits, labels: Tensor) -> Tensor:
        return self.divergence(student_logits, teacher_logits, labels)


class ForwardKLWithChunkedOutputLoss(ChunkedOutputKDLoss):
    """KL(p ‖ q) (``distillm_tune.losses.ForwardKLLoss``; torchtune's own adds H(p))."""

    divergence_cls = ForwardKLLoss


class ReverseKLWithChunkedOutputLoss(ChunkedOutputKDLoss):
    """KL(q ‖ p) (``ReverseKLLoss``)."""

    divergence_cls = ReverseKLLoss


class SkewForwardKLWithChunkedOutputLoss(ChunkedOutputKDLoss):
    """SKL(α) (``SkewForwardKLLoss``; ``alpha``)."""

    divergence_cls = SkewForwardKLLoss


class SkewReverseKLWithChunkedOutputLoss(ChunkedOutputKDLoss):
    """SRKL(α) (``SkewReverseKLLoss``; ``alpha``), DistiLLM's divergence."""

    divergence_cls = SkewReverseKLLoss


class JSDWithChunkedOutputLoss(ChunkedOutputKDLoss):
    """Generalised JSD(β) (``JSDLoss``; ``beta``)."""

    divergence_cls = JSDLoss


class TVDWithChunkedOutputLoss(ChunkedOutputKDLoss):
    """Total variation distance (``TVDLoss``)."""

    divergence_cls = TVDLoss


class InterpolatedSkewKLWithChunkedOutputLoss(ChunkedOutputKDLoss):
    """ISKL (``InterpolatedSkewKLLoss``; ``alpha``, ``beta``)."""

    divergence_cls = InterpolatedSkewKLLoss


# short divergence name (as in DIVERGENCES) -> kd_loss component for torchtune's KD recipes
KD_RECIPE_LOSSES: Dict[str, Type[ChunkedOutputKDLoss]] = {
    "fkl": ForwardKLWithChunkedOutputLoss,
    "rkl": ReverseKLWithChunkedOutputLoss,
    "skl": SkewForwardKLWithChunkedOutputLoss,
    "srkl": SkewReverseKLWithChunkedOutputLoss,
    "jsd": JSDWithChunkedOutputLoss,
    "tvd": TVDWithChunkedOutputLoss,
    "iskl": InterpolatedSkewKLWithChunkedOutputLoss,
}
