"""Plasticity callbacks: shrink-and-perturb (θ ← λ·θ + σ·ε at task boundaries or every N steps) and
continual backpropagation (reinitialise a few mature low-utility hidden units after each step).

Ash & Adams, 2020, "On Warm-Starting Neural Network Training": a model warm-started on earlier data
generalises worse than one trained from scratch; shrinking its weights and adding a little noise when new
data arrives restores that plasticity. The maths is :func:`robustft.ops.perturb.shrink_perturb_`; the
noise ε of tensor i at step t is regenerated from ``noise_seed(seed, t, i)`` like
``RandomPerturbationCallback``'s, so nothing is stored and a run can be reproduced or checked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from robustft.callbacks.base import RobustCallback
from robustft.checks import check_bool, check_integer, check_non_negative, check_number, compile_patterns
from robustft.core import distributed
from robustft.core.params import is_sharded, local_tensor, select_parameters
from robustft.interpolation.wemoe import ARCHITECTURES
from robustft.ops.perturb import noise_seed, seeded_normal, shrink_perturb_
from robustft.ops.plasticity import (
    bias_corrected_utility,
    contribution_utility,
    replace_units_,
    units_to_replace,
)

__all__ = ["ContinualBackpropCallback", "HiddenLayer", "ShrinkPerturbCallback", "hidden_layers"]


class ShrinkPerturbCallback(RobustCallback):
    """θ ← λ·θ + σ·ε, ε ~ N(0, I) from a seed, on the selected trainable parameters.

    Strength: Ash & Adams (NeurIPS 2020, "On Warm-Starting Neural Network Training", Sec. 4-5) shrink once
    per warm start, with λ well below 1 and small noise (λ around 0.3-0.6 and σ around 10⁻⁴-10⁻²; from memory,
    not checked here), and show the result depends on both. Applied every few steps inside one run, λ must be
    close to 1 (it compounds). One value per run: sweep λ (or σ) with
    :func:`robustft.analysis.strength.strength_sweep` (``lambda s: ShrinkPerturbCallback(1 - s, sigma)``).

    Args:
        shrink: λ in (0, 1].
        sigma: σ >= 0, the noise's standard deviation.
        every_n_steps: apply after every N-th optimizer step (never after the last one: the trained model
            is returned as trained).
        at_train_begin: apply when a (non-resumed) training run starts: the task boundary when each task
            is its own ``trainer.train()`` on a warm-started model.
        seed: ε of tensor i at step t (0 at train begin) is drawn from ``noise_seed(seed, t, i)``.
        include / exclude: regexes selecting the parameters.
    """

    state_name = "shrink_perturb"

    def __init__(
        self,
        shrink: float,
        sigma: float,
        every_n_steps: int | None = None,
        at_train_begin: bool = False,
        seed: int = 0,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        shrink = check_number("shrink", shrink, low=0, high=1, low_open=True)
        sigma = check_non_negative("sigma", sigma)
        check_bool("at_train_begin", at_train_begin)
        if every_n_steps is not None:
            every_n_steps = check_number("every_n_steps", every_n_steps, low=1, integer=True)
        if every_n_steps is None and not at_train_begin:
            raise ValueError("every_n_steps / at_train_begin: say when to shrink and perturb "
                             "(every_n_steps=N or at_train_begin=True)")
        seed = check_integer("seed", seed)
        compile_patterns("include", include)
        compile_patterns("exclude", exclude)
        self.shrink, self.sigma = float(shrink), float(sigma)
        self.every_n_steps, self.at_train_begin = every_n_steps, at_train_begin
        self.seed = seed
        self.include, self.exclude = include, exclude
        self._params: dict[str, torch.Tensor] = {}
        self._model = None

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        # nothing to resume (the noise is regenerated from the seed); the options are kept for the record
        return {}, {"shrink": self.shrink, "sigma": self.sigma, "seed": self.seed}

    def apply(self, step: int) -> None:
        """Shrink and perturb the selected parameters now, with the noise of ``step``."""
        shard = distributed.rank() if is_sharded(self._params) else 0  # FSDP2 shards: each draws its own
        if self.shrink == 1.0 and self.sigma == 0.0:
            return
        for i, p in enumerate(self._params.values()):
            seed = noise_seed(self.seed, step, i + (shard << 32))
            shrink_perturb_(local_tensor(p), self.shrink, self.sigma, seed)
        distributed.reshard(self._model)
        self.pending_logs["shrink_perturb/step"] = float(step)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self._model = model
        self._params = select_parameters(model, include=self.include, exclude=self.exclude)
        owner = self.trainer if self.trainer is not None else self._params
        if distributed.deepspeed_stage(owner) is not None:
            raise ValueError("ShrinkPerturbCallback does not support DeepSpeed: its optimizer keeps master "
                             "weights that would overwrite the shrunk ones; use DDP or FSDP2")
        if self.at_train_begin and self.resume_dir(args, state) is None:
            self.apply(state.global_step)

    def on_optimizer_step(self, args, state, control, **kwargs):
        # right after optimizer.step(), before any callback's on_step_end (averages update there): what an
        # average sees of step ``step`` does not depend on the order of the callback list
        n, step = self.every_n_steps, state.global_step + 1
        if n is not None and step % n == 0 and step < state.max_steps:
            self.apply(step)


#: activation modules that make ``Linear → activation → Linear`` in an ``nn.Sequential`` a hidden layer
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Mish,
    nn.Softplus, nn.Hardtanh, nn.ReLU6, nn.Hardswish, nn.PReLU,
)


@dataclass(frozen=True)
class HiddenLayer:
    """One layer of hidden units: h = act(incoming(x)) read by ``reader`` (its input is h).

    ``incoming``: (parameter name, weight, axis of the units) of each map producing the units (two for
    Llama's gate and up projections); ``biases``: their biases; ``outgoing``: (name, weight, axis) of the
    map reading them. Axes: an ``nn.Linear`` weight (out × in) has the units on axis 0 when incoming and 1
    when outgoing; GPT-2's ``Conv1D`` (in × out) the other way round.
    """

    name: str
    incoming: tuple[tuple[str, nn.Parameter, int], ...]
    biases: tuple[tuple[str, nn.Parameter], ...]
    outgoing: tuple[str, nn.Parameter, int]
    reader: nn.Module

    @property
    def units(self) -> int:
        name, weight, axis = self.incoming[0]
        return weight.shape[axis]

    def fan_in(self, index: int) -> int:
        """Inputs per unit of incoming map ``index``."""
        _, weight, axis = self.incoming[index]
        return weight.shape[1 - axis]


def _linear(model: nn.Module, path: str) -> nn.Module:
    module = model.get_submodule(path)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"continual backprop: {path} is not a linear layer ({type(module).__name__}); a "
                         "PEFT-wrapped or quantized MLP cannot have its units reinitialised")
    return module


def _layer(
    model: nn.Module, name: str, incoming: Sequence[str], outgoing: str, transposed: bool
) -> HiddenLayer:
    join = (lambda p: f"{name}.{p}") if name else (lambda p: p)
    axis_in, axis_out = (1, 0) if transposed else (0, 1)
    ins, biases = [], []
    for path in incoming:
        module = _linear(model, join(path))
        ins.append((f"{join(path)}.weight", module.weight, axis_in))
        if getattr(module, "bias", None) is not None:
            biases.append((f"{join(path)}.bias", module.bias))
    reader = _linear(model, join(outgoing))
    layer = HiddenLayer(name or "(model)", tuple(ins), tuple(biases), (f"{join(outgoing)}.weight",
                        reader.weight, axis_out), reader)
    sizes = {w.shape[a] for _, w, a in ins} | {reader.weight.shape[axis_out]}
    if len(sizes) != 1:
        raise ValueError(f"continual backprop: the linear maps of {layer.name} disagree on the number of "
                         f"hidden units ({sorted(sizes)})")
    return layer


def hidden_layers(model: nn.Module) -> list[HiddenLayer]:
    """The layers of hidden units continual backprop can reinitialise: ``Linear → activation → Linear`` in an
    ``nn.Sequential``, and the MLP blocks of BERT, GPT-2 and Llama (the blocks WEMoE knows,
    ``robustft.interpolation.wemoe.ARCHITECTURES``: every linear map but the last makes the units, the last
    reads them). A model with none is refused by name."""
    found = []
    for name, module in model.named_modules():
        spec = ARCHITECTURES.get(type(module).__name__)
        if spec is not None:
            found.append(_layer(model, name, spec.linears[:-1], spec.linears[-1], spec.transposed))
        elif isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for i in range(len(children) - 2):
                (a, first), (_, act), (c, second) = children[i : i + 3]
                if type(first) is nn.Linear and isinstance(act, ACTIVATIONS) and type(second) is nn.Linear:
                    layer = _layer(model, name, [a], c, transposed=False)
                    found.append(replace(layer, name=f"{name}.{a}" if name else a))
    if not found:
        raise ValueError(f"continual backprop: {type(model).__name__} has no hidden layer it can "
                         "reinitialise (Linear → activation → Linear in an nn.Sequential, or a "
                         "BERT/GPT-2/Llama MLP block)")
    return found


class ContinualBackpropCallback(RobustCallback):
    """Continual backpropagation (Dohare et al., "Loss of plasticity in deep continual learning", Nature 632,
    2024, Algorithm 1): after every optimizer step, in each hidden layer, the ⌊c⌋ mature units (age > m) of
    lowest contribution utility are reinitialised - incoming weights drawn from the initial distribution,
    incoming biases and outgoing weights set to 0, utility and age reset, and the optimizer's state of those
    entries (momentum, Adam's moments) zeroed - where c accumulates ρ·(number of mature units) per step.

    The contribution utility is the running average u_i ← η·u_i + (1 − η)·|h_i|·Σ_k |w_out[k, i]|, |h_i| the
    unit's mean absolute activation over the step's examples (and positions; summed across DDP ranks, so
    every rank replaces the same units), ranked after the bias correction u_i/(1 − η^{a_i}) of the authors'
    code. Layers: ``Linear → activation → Linear`` in an ``nn.Sequential`` and BERT/GPT-2/Llama MLP blocks
    (:func:`hidden_layers`); the activations are read by pre-hooks on the reading layer that exist only
    while the Trainer's ``training_step`` runs.

    Args:
        replacement_rate: ρ in (0, 1], the fraction of mature units replaced per step (the paper: 1e-4).
        maturity_threshold: m >= 0, steps a unit is protected after it is (re)initialised (the paper: 100).
        decay: η in [0, 1), the utility's running-average rate (the paper: 0.99).
        init: the initial distribution: ``"auto"`` (N(0, initializer_range²) for a transformers model with
            ``config.initializer_range``, else ``"uniform"``), ``"uniform"`` (U(±1/√fan_in), ``nn.Linear``'s
            default) or a standard deviation σ > 0 (N(0, σ²)).
        bias_correction: rank by u/(1 − η^a) (the authors' code) instead of u.
        seed: the new weights of layer j at step t are drawn from ``noise_seed(seed, t, j)``.
        include / exclude: regexes on the hidden layer's name (the block's module name).
    Logs ``cbp/replaced`` (units reinitialised since the last log). Refuses DeepSpeed, FSDP2 shards and
    frozen layers by name.
    """

    state_name = "continual_backprop"

    def __init__(
        self,
        replacement_rate: float = 1e-4,
        maturity_threshold: int = 100,
        decay: float = 0.99,
        init: str | float = "auto",
        bias_correction: bool = True,
        seed: int = 0,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.replacement_rate = float(check_number("replacement_rate", replacement_rate, low=0, high=1,
                                                   low_open=True))
        self.maturity_threshold = check_number("maturity_threshold", maturity_threshold, low=0, integer=True)
        self.decay = float(check_number("decay", decay, low=0, high=1, high_open=True))
        if isinstance(init, str):
            if init not in ("auto", "uniform"):
                raise ValueError(f"init: must be 'auto', 'uniform' or a standard deviation > 0, got {init!r}")
        else:
            init = float(check_number("init", init, low=0, low_open=True))
        check_bool("bias_correction", bias_correction)
        self.init, self.bias_correction = init, bias_correction
        self.seed = check_integer("seed", seed)
        self.include, self.exclude = include, exclude
        self._patterns = (compile_patterns("include", include), compile_patterns("exclude", exclude))
        self.layers: list[HiddenLayer] = []
        self.utility: list[torch.Tensor] = []
        self.ages: list[torch.Tensor] = []
        self.accumulated: list[float] = []
        self._std: float | None = None
        self._optimizer = None
        self._sums: list[torch.Tensor | None] = []
        self._counts: list[int] = []
        self._replaced = 0

    # -- set-up -------------------------------------------------------------------------------------
    def _select(self, model: nn.Module) -> list[HiddenLayer]:
        include, exclude = self._patterns
        chosen = [layer for layer in hidden_layers(model)
                  if (not include or any(p.search(layer.name) for p in include))
                  and not any(p.search(layer.name) for p in exclude)]
        if not chosen:
            raise ValueError("ContinualBackpropCallback: include/exclude leave no hidden layer")
        for layer in chosen:
            for name, p in [(n, w) for n, w, _ in layer.incoming] + list(layer.biases) + [layer.outgoing[:2]]:
                if not p.requires_grad:
                    raise ValueError(f"ContinualBackpropCallback: {name} is frozen; continual backprop "
                                     "reinitialises trained units (exclude its layer)")
        return chosen

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.trainer is None:
            raise RuntimeError("ContinualBackpropCallback: no Trainer found; pass the callback to a "
                               "transformers.Trainer (or call .attach(trainer)) so it can read the "
                               "activations")
        if distributed.deepspeed_stage(self.trainer) is not None:
            raise ValueError("ContinualBackpropCallback does not support DeepSpeed: its optimizer keeps "
                             "master weights and state the reinitialisation cannot reach; use DDP")
        self.layers = self._select(model)
        params = {n: w for layer in self.layers for n, w, _ in layer.incoming}
        if is_sharded(params):
            raise ValueError("ContinualBackpropCallback does not support FSDP2 shards: a unit's weights must "
                             "be whole on every rank; use DDP")
        self._std = self._init_std(model)
        self._optimizer = optimizer if optimizer is not None else self.trainer.optimizer
        device = self.layers[0].outgoing[1].device
        self.utility = [torch.zeros(layer.units, dtype=torch.float64, device=device) for layer in self.layers]
        self.ages = [torch.zeros(layer.units, dtype=torch.long, device=device) for layer in self.layers]
        self.accumulated = [0.0] * len(self.layers)
        self._reset_sums()
        resume = self.resume_dir(args, state)
        if resume is not None:
            self.load_from(resume)
        self._hook_training_step()

    def _init_std(self, model: nn.Module) -> float | None:
        """σ of the normal initial distribution, or None for U(±1/√fan_in)."""
        if self.init == "uniform":
            return None
        if self.init != "auto":
            return self.init
        std = getattr(getattr(model, "config", None), "initializer_range", None)
        return float(std) if isinstance(std, (int, float)) and std > 0 else None

    def _reset_sums(self) -> None:
        self._sums = [None] * len(self.layers)
        self._counts = [0] * len(self.layers)

    def _hook_training_step(self) -> None:
        """Wrap ``training_step``: pre-hooks on the reading layers add up |h| for the duration of one call."""

        def make_wrapper(original):
            def training_step(model, *args, **kwargs):
                handles = [layer.reader.register_forward_pre_hook(self._reader_hook(i))
                           for i, layer in enumerate(self.layers)]
                try:
                    return original(model, *args, **kwargs)
                finally:
                    for handle in handles:
                        handle.remove()

            return training_step

        self.wrap_method("training_step", make_wrapper)

    def _reader_hook(self, index: int):
        def hook(module, inputs):
            h = inputs[0].detach()
            rows = h.reshape(-1, h.shape[-1])
            total = rows.abs().sum(dim=0, dtype=torch.float64)
            self._sums[index] = total if self._sums[index] is None else self._sums[index] + total
            self._counts[index] += rows.shape[0]

        return hook

    # -- the step -------------------------------------------------------------------------------------
    def on_optimizer_step(self, args, state, control, **kwargs):
        """Algorithm 1 after the update: ages, utilities, then the replacement of each selected layer."""
        step = state.global_step + 1
        for j, layer in enumerate(self.layers):
            if self._sums[j] is None:
                continue
            sums = distributed.all_reduce_sum(self._sums[j].clone())
            count = distributed.all_reduce_sum(torch.tensor([float(self._counts[j])], device=sums.device))
            mean_abs = sums / count.clamp_min(1.0)
            name, weight, axis = layer.outgoing
            outgoing = weight.detach().abs().sum(dim=1 - axis, dtype=torch.float64)
            self.ages[j] += 1
            self.utility[j] = contribution_utility(self.utility[j], mean_abs.to(self.utility[j].device),
                                                   outgoing.to(self.utility[j].device), self.decay)
            ranking = (bias_corrected_utility(self.utility[j], self.ages[j], self.decay)
                       if self.bias_correction else self.utility[j])
            units, self.accumulated[j] = units_to_replace(ranking, self.ages[j], self.maturity_threshold,
                                                          self.replacement_rate, self.accumulated[j])
            if units.numel():
                self._replace(j, layer, units, step)
        self._reset_sums()

    def _fresh(self, layer: HiddenLayer, index: int, units: torch.Tensor, seed: int) -> torch.Tensor:
        """New incoming weights of ``units`` (laid out as ``weight.index_select(axis, units)``)."""
        _, weight, axis = layer.incoming[index]
        shape = (units.numel(), layer.fan_in(index))
        z = seeded_normal(shape, seed, device=weight.device)
        if self._std is not None:
            fresh = z * self._std
        else:  # U(±1/√fan_in) from the same seeded draw: Φ maps a normal onto a uniform
            u = torch.special.ndtr(z) * 2 - 1
            fresh = u / math.sqrt(layer.fan_in(index))
        return fresh if axis == 0 else fresh.T

    def _replace(self, j: int, layer: HiddenLayer, units: torch.Tensor, step: int) -> None:
        incoming = [(w, axis, self._fresh(layer, k, units, noise_seed(self.seed, step, (j << 8) + k)))
                    for k, (_, w, axis) in enumerate(layer.incoming)]
        replace_units_(incoming, [b for _, b in layer.biases], layer.outgoing[1:], units)
        self.utility[j][units] = 0.0
        self.ages[j][units] = 0
        self._reset_optimizer_state(layer, units)
        self._replaced += int(units.numel())
        self.pending_logs["cbp/replaced"] = float(self._replaced)

    @torch.no_grad()
    def _reset_optimizer_state(self, layer: HiddenLayer, units: torch.Tensor) -> None:
        """Zero the optimizer's per-entry state of the replaced units (momentum, Adam's first and second
        moments); a scalar state such as Adam's step count is shared by the whole tensor and kept."""
        state = getattr(self._optimizer, "state", {})
        entries = [(w, axis) for _, w, axis in layer.incoming] + [(b, 0) for _, b in layer.biases]
        entries.append(layer.outgoing[1:])
        for param, axis in entries:
            for value in state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value.index_fill_(axis, units.to(value.device), 0.0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        if logs is not None:
            self._replaced = 0

    def on_train_end(self, args, state, control, **kwargs):
        self.unwrap_method("training_step")
        super().on_train_end(args, state, control, **kwargs)

    # -- state ----------------------------------------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {}
        for layer, u, a in zip(self.layers, self.utility, self.ages, strict=True):
            tensors[f"utility.{layer.name}"] = u.cpu()
            tensors[f"ages.{layer.name}"] = a.cpu()
        meta = {"accumulated": self.accumulated, "layers": [layer.name for layer in self.layers]}
        return tensors, meta

    def load_state_dict(self, tensors, meta, source):
        names = [layer.name for layer in self.layers]
        if meta.get("layers") != names:
            raise ValueError(f"{source}: saved for hidden layers {meta.get('layers')}, this run has {names}")
        for j, name in enumerate(names):
            for key, into in ((f"utility.{name}", self.utility), (f"ages.{name}", self.ages)):
                saved = tensors.get(key)
                if saved is None or saved.shape != into[j].shape:
                    raise ValueError(f"{source}: {key!r} missing or not of shape {tuple(into[j].shape)}")
                into[j] = saved.to(device=into[j].device, dtype=into[j].dtype)
        self.accumulated = [float(c) for c in meta["accumulated"]]
