"""A model as a function of its weights: run it on given weights, train leaf tensors through it, know its
kind.

The shared helpers of interpolation/ (learned coefficients, WEMoE's routers) and analysis/ (RiFT, sharpness):
:func:`call_with_weights` (one batch through ``torch.func.functional_call``), :func:`minimise` (the one
optimisation loop, its options checked by ``robustft.checks``) and :func:`is_causal_lm` (per-token
entropies for causal LMs). The loss of an output is ``robustft.ops.outputs.model_loss``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from robustft.checks import check_choice, check_number, short_repr
from robustft.ops.dawin import batch_entropy, prediction_entropy
from robustft.ops.outputs import model_logits, model_loss

__all__ = [
    "OBJECTIVES", "OPTIMIZERS", "as_batches", "call_with_weights", "cycle_batches", "is_causal_lm",
    "minimise",
]

OBJECTIVES = ("loss", "entropy")
OPTIMIZERS = ("adam", "sgd")


def is_causal_lm(model: nn.Module) -> bool:
    """True when the model holds a causal LM module (its entropies are per next-token): a ``...ForCausalLM``
    class or one of transformers' causal-LM classes named otherwise (``GPT2LMHeadModel``, ...)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as names
    except ImportError:  # transformers without its auto mapping: the naming convention only
        names = {}
    others = {c for v in names.values() for c in ((v,) if isinstance(v, str) else v)}
    return any(type(m).__name__.endswith("ForCausalLM") or type(m).__name__ in others
               for m in model.modules())


def cycle_batches(data: Iterable[Any]) -> Iterator[Any]:
    """The batches of ``data`` again and again (a DataLoader is re-iterated, so it reshuffles)."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError("data: no batch to learn the coefficients on")


def as_batches(data: Any) -> list[Any]:
    """The batches, read once (a shuffling DataLoader would give each pass other batches): a mapping, a
    tensor or a tuple ``(inputs, *targets)`` is one batch; a list, a DataLoader or another iterable holds
    batches."""
    batches = [data] if isinstance(data, (Mapping, torch.Tensor, tuple)) else list(data)
    if not batches:
        raise ValueError("data: no batch to run the model on")
    return batches


def call_with_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], batch: Any) -> Any:
    """The model's output on ``batch``: a mapping as keyword arguments, a tuple/list ``(inputs, *rest)`` as
    its first element (the rest, e.g. targets, is for the ``loss_fn``), anything else as the one argument."""
    if isinstance(batch, Mapping):
        return functional_call(model, dict(weights), args=(), kwargs=dict(batch))
    inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
    return functional_call(model, dict(weights), args=(inputs,))




def _batch_entropy(outputs: Any, batch: Any, causal: bool) -> torch.Tensor:
    """Mean per-input entropy as DaWin's (positions with a label, else the attention mask)."""
    logits = model_logits(outputs)
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if labels is not None:
        return batch_entropy(logits, labels, causal).mean()
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) and logits.dim() == 3 else None
    return prediction_entropy(logits, mask).mean()


def minimise(
    params: Sequence[torch.Tensor],
    forward: Callable[[Any], Any],
    data: Iterable[Any],
    objective: str,
    steps: int,
    lr: float,
    optimizer: str,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None,
    clamp: tuple[float, float] | None,
    causal: bool,
) -> list[float]:
    """``steps`` optimizer steps on ``params`` (leaf tensors, updated in place) of the objective of
    ``forward(batch)`` on the cycled batches of ``data``; the objective's value at each step.

    The one training loop of learned coefficients (:class:`LearnedInterpolation`) and of WEMoE's routers
    (:func:`robustft.interpolation.wemoe.fit_wemoe_router`): ``objective="loss"`` scores ``loss_fn(outputs,
    batch)``
    (default the model's ``outputs.loss``), ``"entropy"`` the batch's mean prediction entropy (DaWin's, per
    sequence for a causal LM when ``causal``). Options are checked (``robustft.checks``) before the first
    step.
    """
    check_choice("objective", objective, OBJECTIVES)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_number("steps", steps, 1, integer=True)
    lr_value = float(check_number("lr", lr, 0, low_open=True))
    if clamp is not None:
        if not (isinstance(clamp, (tuple, list)) and len(clamp) == 2):
            raise ValueError(f"clamp: expected (low, high), got {short_repr(clamp)}")
        low = check_number("clamp[0]", clamp[0])
        check_number("clamp[1]", clamp[1], low)
    if objective == "loss":
        score = loss_fn or model_loss
    else:
        def score(outputs, batch):
            return _batch_entropy(outputs, batch, causal)

    params = list(params)
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(params, lr=lr_value)
    history = []
    batches = cycle_batches(data)
    for step in range(steps):
        batch = next(batches)
        value = score(forward(batch), batch)
        if not torch.isfinite(value):
            raise FloatingPointError(f"fit: the {objective} is not finite at step {step} ({float(value)})")
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        if clamp is not None:
            with torch.no_grad():
                for p in params:
                    p.clamp_(float(clamp[0]), float(clamp[1]))
        history.append(float(value.detach()))
    return history
