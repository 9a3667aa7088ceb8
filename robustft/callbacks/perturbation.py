"""Weight perturbations as ``TrainerCallback``s: the shared base and the one-pass family.

* :class:`WeightPerturbation` - what every perturbation callback shares (exact SAM in
  ``robustft.callbacks.sam`` included): options, parameter selection, the ρ schedule, the hook on
  ``trainer.training_step``, metrics.
* :class:`MomentumSAMCallback`, :class:`RandomPerturbationCallback` (RWP / Flat-LoRA),
  :class:`MGPOCallback` (LoRA-MGPO, arXiv 2502.14538 v2+) - one forward/backward per step: ε is
  chosen at ``on_step_begin`` and applied around each micro-batch inside the wrapped ``training_step``
  (undone when it returns or raises), so the gradient is taken at w + ε, the step applied to w, and the
  weights are unperturbed whenever anything else runs: an error raised anywhere in ``train()`` leaves
  them exactly unperturbed.

The maths is in ``robustft.ops.perturb``; PEFT LoRA layers are found by ``robustft.lora.layers``.

How the callbacks reach the Trainer: callbacks are never handed the Trainer or the batch. These
callbacks find the Trainer that calls ``on_train_begin`` (it is on the call stack), or you pass it
with ``callback.attach(trainer)``. They then wrap ``trainer.training_step`` (an instance attribute,
removed at ``on_train_end``) to undo a perturbation when a micro-batch raises (exact SAM also records
the micro-batches).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from robustft.callbacks.base import RobustCallback
from robustft.checks import check_bool, check_integer, check_number, compile_patterns, short_repr
from robustft.core import distributed
from robustft.core.params import (
    SelectionGuard,
    dequantized_weight,
    full_shape,
    is_sharded,
    is_zero3_param,
    local_tensor,
    quantization,
    select_parameters,
    zero3_partition,
)
from robustft.lora.layers import lora_delta, lora_layers, low_rank_factors
from robustft.ops.dtypes import compute_dtype
from robustft.ops.perturb import (
    Fixup,
    flat_row_sq_norms,
    global_norm,
    low_rank_merged_row_sq_norms,
    low_rank_tangent_sq_norm,
    mgpo_factor,
    mgpo_grad_ema,
    momentum_epsilon,
    noise_seed,
    perturb_,
    row_noise,
    row_sq_norms,
    rwp_row_scale,
    scheduled_rho,
    seeded_noise_linear,
    unperturb_,
)

__all__ = [
    "MGPOCallback",
    "MomentumSAMCallback",
    "RandomPerturbationCallback",
    "WeightPerturbation",
]

_SCHEDULES = ("constant", "linear")


class WeightPerturbation(RobustCallback):
    """What all variants share: options, parameter selection, ρ schedule, the Trainer hook, metrics."""

    log_prefix = "sam"
    #: True when the callback keeps state a resumed run must read back
    has_state = False

    def __init__(
        self,
        rho: float,
        schedule: str = "constant",
        start_step: int = 0,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        skip_norm_and_bias: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        rho = check_number("rho", rho, low=0.0, low_open=True)
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule: {short_repr(schedule)} is not one of {_SCHEDULES}")
        start_step = check_number("start_step", start_step, low=0, integer=True)
        check_bool("skip_norm_and_bias", skip_norm_and_bias)
        compile_patterns("include", include)
        compile_patterns("exclude", exclude)
        self.rho = float(rho)
        self.schedule = schedule
        self.start_step = start_step
        self.include = include
        self.exclude = exclude
        self.skip_norm_and_bias = skip_norm_and_bias
        self._orig_training_step = None
        self._model = None
        self._params: dict[str, torch.Tensor] = {}
        self._guard: SelectionGuard | None = None
        self._sums: dict[str, list[float]] = {}
        self._sharded: tuple[dict[str, torch.Tensor], bool] | None = None  # (selection, is it sharded)

    # -- the Trainer ---------------------------------------------------------------------------
    def _hook_trainer(self, required: bool) -> None:
        if self.trainer is None:
            if required:
                raise ValueError(
                    f"{type(self).__name__}: no Trainer found; call callback.attach(trainer) before train()"
                )
            return
        if getattr(self.trainer, "is_deepspeed_enabled", False) and required:
            raise ValueError(
                f"{type(self).__name__} does not support DeepSpeed: the engine steps inside its own "
                "backward, so the gradient cannot be replaced before the step. Use DDP or FSDP, or a "
                "one-pass variant."
            )

        def make_wrapper(orig):
            def training_step(model, inputs, num_items_in_batch=None, *args, **kwargs):
                recorded = self._before_micro_batch(model, inputs, num_items_in_batch)
                try:
                    loss = orig(model, inputs, num_items_in_batch, *args, **kwargs)
                except BaseException:
                    self._on_micro_batch_error()
                    raise
                self._after_micro_batch(recorded, loss)
                return loss

            return training_step

        self._orig_training_step = self.wrap_method("training_step", make_wrapper)

    def _unhook_trainer(self) -> None:
        self.unwrap_method("training_step")
        self._orig_training_step = None

    def _before_micro_batch(self, model, inputs, num_items_in_batch) -> Any:
        return None

    def _after_micro_batch(self, recorded: Any, loss: torch.Tensor) -> None:
        pass

    def _on_micro_batch_error(self) -> None:
        pass

    # -- helpers -------------------------------------------------------------------------------
    def _select(self, model) -> dict[str, torch.Tensor]:
        return select_parameters(
            model, self.include, self.exclude, trainable_only=True, skip_norm_and_bias=self.skip_norm_and_bias
        )

    def _rho_at(self, state) -> float:
        return scheduled_rho(self.rho, self.schedule, state.global_step, self.start_step, state.max_steps)

    def _is_sharded(self) -> bool:
        """``is_sharded`` of the selection, found once per selection: it walks every tensor, and the noise of
        each tensor asks (per tensor and micro-batch, that walk was a few percent of a step)."""
        if self._sharded is None or self._sharded[0] is not self._params:
            self._sharded = (self._params, is_sharded(self._params))
        return self._sharded[1]

    def _reduce(self):
        return distributed.all_reduce_sum if self._is_sharded() else None

    def _record(self, name: str, value: float, mean: bool = True) -> None:
        """Mean (or sum, for counts) of a metric over the steps since the last Trainer log."""
        total = self._sums.setdefault(name, [0.0, 0])
        total[0] += float(value)
        total[1] += 1
        self.pending_logs[f"{self.log_prefix}/{name}"] = total[0] / total[1] if mean else total[0]

    def _warn_nonfinite(self, state, what: str, outcome: str) -> None:
        """Warn that ``what`` is non-finite at this step and say what happens (``outcome``); count it."""
        warnings.warn(
            f"{type(self).__name__}: non-finite {what} at step {state.global_step}; no perturbation this "
            f"step: {outcome}",
            RuntimeWarning,
            stacklevel=3,
        )
        self._record("skipped_nonfinite", 1.0, mean=False)

    # -- events --------------------------------------------------------------------------------
    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=logs, **kwargs)
        if logs is not None:
            self._sums = {}

    def on_train_end(self, args, state, control, **kwargs):
        self._unhook_trainer()


class _OnePass(WeightPerturbation):
    """Choose ε at ``on_step_begin``; apply it around each micro-batch in ``training_step``, undone exactly
    when it returns or raises (DeepSpeed: before the engine's step). Without a known Trainer (events called
    by hand) ε is applied at ``on_step_begin`` and undone at ``on_pre_optimizer_step``.

    Nothing parameter-sized is kept: the perturbation is regenerated from small per-tensor data
    (a seed, row scales, a norm) and :func:`robustft.ops.perturb.perturb_` keeps only the elements
    where floating point does not round-trip (a few percent, reported as ``<prefix>/fixup_fraction``).
    """

    def __init__(self, rho: float, seed: int = 0, **kwargs):
        super().__init__(rho, **kwargs)
        self.seed = check_integer("seed", seed)
        # index -> (tensor, per-tensor context, fixup) for the perturbation in force
        self._applied: list[tuple[int, torch.Tensor, Any, Fixup]] = []
        self._step = 0
        # (contexts, state, first application) of the step's perturbation, from on_step_begin to the step
        self._pending: tuple[list[Any], Any, bool] | None = None
        self._engine = None  # the DeepSpeed engine whose step undoes the perturbation, if any
        # (device, dtype) -> one reusable buffer the noise of one tensor at a time is drawn into (the largest
        # perturbed tensor's size, kept from the step's first draw to its optimizer step)
        self._scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _targets(self, model) -> dict[str, torch.Tensor]:
        return self._select(model)

    def _scratch_for(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous ``shape`` view of this callback's scratch buffer: the noise of one tensor is used and
        dropped before the next is drawn, so one buffer serves them all without a fresh allocation each."""
        n, key = math.prod(shape), (torch.device(device), dtype)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < n:
            buf = self._scratch[key] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def _seed_for(self, step: int, index: int) -> int:
        # replicated weights (DDP) draw the same noise on every rank; FSDP2 shards each draw their own
        shard = distributed.rank() if self._is_sharded() else 0
        return noise_seed(self.seed, step, index + (shard << 32))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, model=model, **kwargs)
        self._hook_trainer(required=False)
        self._model = model
        self._params = self._targets(model)
        self._guard = SelectionGuard(type(self).__name__, model, self._params)
        self._hook_deepspeed_step(model)
        resume = self.resume_dir(args, state)
        if resume is not None and self.has_state:
            self.load_from(resume)

    def _hook_deepspeed_step(self, model) -> None:
        """Under DeepSpeed, undo the perturbation just before the engine's step.

        The engine steps inside the backward of the last micro-batch, before ``on_pre_optimizer_step``,
        and then copies its fp32 master weights into the model: an undo after that would corrupt them.
        """
        stage = distributed.deepspeed_stage(self.trainer if self.trainer is not None else model)
        if stage is None:
            return
        engine = distributed.deepspeed_engine(self.trainer)
        if engine is None:
            raise ValueError(f"{type(self).__name__}: DeepSpeed ZeRO-{stage} runs but no engine was found")
        self._engine = engine

        def make_wrapper(original):
            def step(*args, **kwargs):
                self._before_deepspeed_step()
                return original(*args, **kwargs)

            return step

        self.wrap_method("step", make_wrapper, target=engine)

    def _before_deepspeed_step(self) -> None:
        self._restore()

    # subclasses: small per-tensor context (None = do not perturb this tensor), then the noise from it
    def _contexts(self, weights: list[torch.Tensor], rho: float, state, optimizer) -> list[Any]:
        raise NotImplementedError

    def _noise(self, index: int, w: torch.Tensor, ctx: Any) -> torch.Tensor:
        raise NotImplementedError

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        """Compute this step's perturbation (small per-tensor contexts); it is applied around each micro-batch
        inside the Trainer's ``training_step`` (see :meth:`_before_micro_batch`), else (no Trainer known:
        events called by hand) here, until ``on_pre_optimizer_step``."""
        self._restore()  # never stack two perturbations
        self._pending = None
        rho = self._rho_at(state)
        if rho <= 0:
            return
        if self._guard is not None:  # set at train begin: a module replaced since would go unperturbed
            self._guard.check()
        self._step = state.global_step
        weights = [local_tensor(p) for p in self._params.values()]
        self._pending = (self._contexts(weights, rho, state, optimizer), state, True)
        if self._orig_training_step is None:
            self._apply()

    def _before_micro_batch(self, model, inputs, num_items_in_batch) -> Any:
        """Perturb for this micro-batch only: the weights are perturbed inside ``training_step`` and nowhere
        else, so whatever raises outside it (another callback, clipping, a KeyboardInterrupt between
        micro-batches) finds the weights unperturbed. Re-applying the same ε is bit-exact (regenerated)."""
        self._apply()
        return None

    def _after_micro_batch(self, recorded: Any, loss: torch.Tensor) -> None:
        self._restore()

    def _apply(self) -> None:
        """Apply the pending perturbation (bit-exactly undoable); the step's first application logs it."""
        if self._pending is None:
            return
        self._restore()
        contexts, state, first = self._pending
        weights = [local_tensor(p) for p in self._params.values()]
        noise_sq = []
        fixed = total = 0
        try:
            for i, (w, ctx) in enumerate(zip(weights, contexts, strict=True)):
                if ctx is None:
                    continue
                e = self._noise(i, w, ctx)
                flat = e.reshape(-1)
                noise_sq.append(torch.dot(flat, flat))  # Σ e², one pass and no e-sized temporary
                # exact to undo even if e holds NaN/Inf: every element then is a fix-up
                fixup = self._perturb(i, w, ctx, e)
                self._applied.append((i, w, ctx, fixup))
                fixed += fixup.numel()
                total += w.numel()
        except BaseException:
            self._restore()
            raise
        distributed.reshard(self._model)  # FSDP2: the next forward gathers the perturbed shards
        if not first or not self._applied:
            return
        self._pending = (contexts, state, False)
        sq = torch.stack([x.float().cpu() for x in noise_sq]).sum() if noise_sq else torch.zeros(())
        reduce = self._reduce()
        if reduce is not None:  # ‖ε‖ of the whole model, the same on every rank
            sq = reduce(sq.to(weights[0].device)).cpu()
        norm = sq.sqrt().item()
        if not math.isfinite(norm):
            self._restore()
            self._pending = None
            self._warn_nonfinite(state, "perturbation", "the gradient is taken at the unperturbed weights")
            return
        self._record("perturbation_norm", norm)
        self._record("fixup_fraction", fixed / max(total, 1))

    def _perturb(self, index: int, w: torch.Tensor, ctx: Any, e: torch.Tensor) -> Fixup:
        """Add ``e`` to the tensor; the fix-up that makes :meth:`_unperturb` exact."""
        return perturb_(w, e)

    def _unperturb(self, index: int, w: torch.Tensor, ctx: Any, fixup: Fixup) -> None:
        unperturb_(w, self._noise(index, w, ctx), fixup)

    def _restore(self) -> None:
        applied, self._applied = self._applied, []
        for i, w, ctx, fixup in reversed(applied):
            self._unperturb(i, w, ctx, fixup)
        if applied:
            distributed.reshard(self._model)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._restore()
        self._pending = None
        self._scratch = {}

    def _on_micro_batch_error(self) -> None:
        self._restore()

    def on_train_end(self, args, state, control, **kwargs):
        self._restore()
        self._pending = None
        self._scratch = {}
        if self._engine is not None:
            self.unwrap_method("step", target=self._engine)
            self._engine = None
        super().on_train_end(args, state, control, **kwargs)

    def on_save(self, args, state, control, **kwargs):
        self._restore()
        super().on_save(args, state, control, **kwargs)


class MomentumSAMCallback(_OnePass):
    """Momentum-SAM (Becker et al., 2024): gradient at w − ρ·v/‖v‖, v = the optimizer's momentum.

    v is SGD's ``momentum_buffer`` or Adam's ``exp_avg``; on the first step (no momentum yet) the
    step is plain. ~1x the cost of a plain step. Options as :class:`SAMCallback` (ρ, schedule, ...).
    """

    state_name = "momentum_sam"
    log_prefix = "msam"

    def __init__(self, rho: float = 0.3, **kwargs):
        super().__init__(rho, **kwargs)
        self._warned = False

    def _contexts(self, weights, rho, state, optimizer):
        if optimizer is None:
            raise ValueError("MomentumSAMCallback: the Trainer passed no optimizer to the callback")
        buffers = []
        if self._engine is not None:  # DeepSpeed ZeRO-1/2 keys its state by flat partitions
            found = distributed.deepspeed_optimizer_states(
                self._engine, self._params.values(), ("momentum_buffer", "exp_avg")
            )
        else:
            found = []
            for p in self._params.values():
                st = optimizer.state.get(p, {}) if hasattr(optimizer, "state") else {}
                found.append(st.get("momentum_buffer", st.get("exp_avg")))
        for buf in found:
            buffers.append(None if buf is None else local_tensor(buf))
        if all(b is None for b in buffers):
            if state.global_step > self.start_step and not self._warned:
                warnings.warn(
                    "MomentumSAMCallback: the optimizer keeps no momentum (momentum_buffer/exp_avg); "
                    "no perturbation is applied",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._warned = True
            return [None] * len(buffers)
        norm = global_norm(buffers, self._reduce())
        if not torch.isfinite(norm):
            self._warn_nonfinite(
                state, "momentum", "the optimizer still steps with this momentum, so its update is non-finite"
            )
            return [None] * len(buffers)
        if norm == 0:
            return [None] * len(buffers)
        return [None if b is None else (b, rho, norm) for b in buffers]

    def _noise(self, index, w, ctx):
        buf, rho, norm = ctx
        return momentum_epsilon(buf, rho, norm)


class _RowWise(_OnePass):
    """One-pass perturbations with Gaussian noise scaled per weight row: ε_{i,j} = z_{i,j}·std_i.

    Subclasses give each tensor's per-row std (row norms from :meth:`_row_sq`). Under ZeRO-3 each rank
    draws its partition's noise and scales each element by its row's std (``scale_flat_rows_``).
    """

    def _noise(self, index, w, ctx):
        scale, step, name = ctx
        param = self._params[name]
        slice_of = (full_shape(param), zero3_partition(param)[0]) if is_zero3_param(param) else None
        seed, dtype = self._seed_for(step, index), compute_dtype(w.dtype)
        out = self._scratch_for(w.shape, dtype, w.device)
        return row_noise(w.shape, scale, seed, device=w.device, slice_of=slice_of, dtype=dtype, out=out)

    def _row_sq(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Squared row norms of ``t``, the local part of parameter ``name`` (or of its gradient).

        FSDP2 shards dim 0, so each rank holds whole rows of a matrix; a 1-D tensor is one row split over
        the ranks, whose squared norm is summed across them. A ZeRO-3 partition is a flat slice that
        cuts rows anywhere: each rank's share of every row is summed across them.
        """
        param = self._params[name]
        if is_zero3_param(param):  # a flat slice of the rows: each rank adds its elements' squares
            offset = zero3_partition(param)[0]
            return distributed.all_reduce_sum(flat_row_sq_norms(t, full_shape(param), offset))
        if is_sharded({name: param}):
            shard_dims = [getattr(pl, "dim", 0) for pl in getattr(param, "placements", ()) if pl.is_shard()]
            if param.dim() > 1 and any(d != 0 for d in shard_dims):
                raise ValueError(
                    f"{type(self).__name__}: {name!r} is sharded along a dim other than 0; row-wise "
                    "perturbations need FSDP2's default Shard(0)"
                )
            rows = row_sq_norms(t)
            return distributed.all_reduce_sum(rows) if param.dim() <= 1 else rows
        return row_sq_norms(t)


class _QuantizedBase:
    """Mixin (before a one-pass base) for an ε that belongs on a LoRA layer's frozen W₀: a quantized W₀
    (QLoRA) cannot hold it, so x·εᵀ joins its layer's output (ε regenerated for the backward, not stored)
    until :meth:`_unperturb`. Subclasses fill ``_quantized`` (target -> base layer), name ``_target_of``."""

    _quantized: dict[str, torch.nn.Module]

    @staticmethod
    def _target_of(ctx) -> str:
        """The target name a perturbation context belongs to."""
        raise NotImplementedError

    def _perturb(self, index, w, ctx, e):
        base = self._quantized.get(self._target_of(ctx))
        if base is None:
            return super()._perturb(index, w, ctx, e)

        def make_wrapper(original):
            def forward(x, *args, **kwargs):
                out = original(x, *args, **kwargs)
                noise = seeded_noise_linear(x, lambda: self._noise(index, w, ctx).to(x.device))
                return out + noise.to(out.dtype)

            return forward

        self.wrap_method("forward", make_wrapper, target=base)
        return Fixup(torch.empty(0, dtype=torch.long), torch.empty(0))

    def _unperturb(self, index, w, ctx, fixup):
        base = self._quantized.get(self._target_of(ctx))
        if base is None:
            return super()._unperturb(index, w, ctx, fixup)
        self.unwrap_method("forward", target=base)


class RandomPerturbationCallback(_QuantizedBase, _RowWise):
    """Random weight perturbation, filter-wise: ε_{i,j} ~ N(0, ρ²/n · ‖W_{i,:}‖²) (RWP; Flat-LoRA for LoRA).

    ρ plays the paper's σ. On a plain model the selected trainable weights are perturbed. On a PEFT
    LoRA model (``lora="auto"`` or ``True``) the perturbation acts on the merged weight
    W' = W₀ + s·BA, as in Flat-LoRA: the row norms are those of W' and the noise is added to the frozen
    base weight W₀ (equivalent, since W' = (W₀ + ε) + s·BA). The noise is regenerated from
    (seed, step, tensor) to undo it; no parameter-sized buffer is kept. ~1x a plain step.

    A quantized W₀ (QLoRA: a bitsandbytes 4-bit or 8-bit base) cannot hold ε: its row norms are taken from
    the dequantized weight (one layer at a time, at each step's start), and x·εᵀ is added to the base
    layer's output while a micro-batch runs (its ``forward`` wrapped for that call only), ε regenerated from
    the seed for the backward (:func:`robustft.ops.perturb.seeded_noise_linear`): the same gradient as
    W₀ + ε would give, without a float copy of W₀.
    """

    state_name = "random_perturbation"
    log_prefix = "rwp"

    def __init__(self, rho: float = 0.05, lora: bool | str = "auto", **kwargs):
        super().__init__(rho, **kwargs)
        if lora not in (True, False, "auto"):
            raise ValueError(f"lora: must be True, False or 'auto', got {lora!r}")
        self.lora = lora
        self._layers: dict[str, torch.nn.Module] = {}
        self._quantized: dict[str, torch.nn.Module] = {}  # target -> its quantized base layer

    def _targets(self, model):
        layers = lora_layers(model)
        if self.lora is True and not layers:
            raise ValueError("lora=True: the model has no PEFT LoRA layer")
        if not layers or self.lora is False:
            self._layers, self._quantized = {}, {}
            return self._select(model)
        candidates = select_parameters(
            model,
            self.include,
            self.exclude,
            trainable_only=False,
            skip_norm_and_bias=self.skip_norm_and_bias,
        )
        targets, self._layers, self._quantized = {}, {}, {}
        for name, layer in layers.items():
            key = f"{name}.base_layer.weight"
            if key in candidates:
                targets[key] = candidates[key]
                self._layers[key] = layer
                if quantization(candidates[key]) is not None:
                    self._quantized[key] = layer.base_layer
        if not targets:
            raise ValueError(
                "RandomPerturbationCallback: include/exclude leave no LoRA base weight to perturb"
            )
        return targets

    def _shape(self, name: str) -> torch.Size:
        """The whole shape of target ``name``; a quantized W₀'s is its layer's (out, in), not its storage."""
        base = self._quantized.get(name)
        if base is None:
            return full_shape(self._params[name])
        return torch.Size((base.out_features, base.in_features))

    @torch.no_grad()
    def _merged_sq_rows(self, name: str, w: torch.Tensor) -> torch.Tensor:
        layer = self._layers.get(name)
        if layer is None:
            return self._row_sq(name, w)
        if name in self._quantized:  # W₀ dequantized for the norms only, one layer at a time
            merged = dequantized_weight(self._quantized[name])
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    merged = merged + lora_delta(layer, adapter)
            return row_sq_norms(merged)
        factors = low_rank_factors(layer)
        if factors is not None:  # plain LoRA Linear, whole tensors: the row norms without s·B·A
            return low_rank_merged_row_sq_norms(w, *factors)
        merged = w.to(compute_dtype(w.dtype))
        for adapter in layer.active_adapters:
            if adapter in layer.lora_A:
                merged = merged + lora_delta(layer, adapter)
        return self._row_sq(name, merged)

    def _contexts(self, weights, rho, state, optimizer):
        return [  # the full shape: a 1-D tensor's n counts the elements of every rank
            (rwp_row_scale(self._merged_sq_rows(name, w), self._shape(name), rho), self._step, name)
            for name, w in zip(self._params, weights, strict=True)
        ]

    def _noise(self, index, w, ctx):
        scale, step, name = ctx
        if name not in self._quantized:
            return super()._noise(index, w, ctx)
        return row_noise(self._shape(name), scale, self._seed_for(step, index), device=w.device)

    @staticmethod
    def _target_of(ctx) -> str:
        return ctx[2]


class MGPOCallback(_QuantizedBase, _OnePass):
    """LoRA-MGPO (Chang et al., "LoRA-MGPO: Mitigating Double Descent in Low-Rank Adaptation via
    Momentum-Guided Perturbation Optimization", EMNLP 2025 Findings; arXiv 2502.14538 v2+): the gradient is
    taken at W + ε_l with, per layer l, ε_l = −ρ · v_l/‖v_l‖ · min(1/ḡ_l, max_scale).

    On a PEFT LoRA model each LoRA layer is one l: v_l = Σ_adapters s·(m_B·A + B·m_A) is the optimizer's
    momentum of the factors (Adam's ``exp_avg``, SGD's ``momentum_buffer``) seen in weight space
    (:func:`robustft.ops.perturb.low_rank_tangent`), added to the frozen base weight W₀ (so the layer
    computes with W₀ + ε + s·B·A), and ḡ_l is the EMA (``beta``) of ‖Σ s·(∇B·A + B·∇A)‖, the layer's
    gradient norm in the same space. On a model without LoRA layers each selected trainable tensor is one l
    (v = its momentum, ḡ = EMA of its gradient norm): the same rule without the factorisation.

    ε is recomputed from the momentum (which the optimizer changes only in its step, after ε is undone), so
    nothing parameter-sized is stored; a layer without momentum yet (the first step) is not perturbed. ḡ is
    updated once per optimizer step from the gradient the optimizer receives (accumulated, clipped); the
    ḡ values (one float per layer) are saved with checkpoints. ~1x a plain step.

    Args:
        rho: ρ > 0 (the paper: 0.05 for T5-base on GLUE, 0.01 for LLaMA-2-7B).
        beta: ḡ's EMA coefficient in [0, 1) (the paper: 0.9 / 0.8).
        normalize: divide by ḡ (the paper's adaptive normalisation); False keeps ε = −ρ·v/‖v‖ per layer.
        max_scale: cap of 1/ḡ (10, as the authors' code).
        include / exclude / skip_norm_and_bias / schedule / start_step: as every perturbation callback
            (on a LoRA model they select among the LoRA layers' base weights ``<layer>.base_layer.weight``).
    Refuses DoRA and LoRA embedding layers, FSDP2 and DeepSpeed by name.
    """

    state_name = "mgpo"
    log_prefix = "mgpo"
    has_state = True

    def __init__(self, rho: float = 0.05, beta: float = 0.9, normalize: bool = True,
                 max_scale: float = 10.0, **kwargs):
        super().__init__(rho, **kwargs)
        beta = check_number("beta", beta, low=0.0, high=1.0, high_open=True)
        check_bool("normalize", normalize)
        max_scale = check_number("max_scale", max_scale, low=0.0, low_open=True)
        self.beta, self.normalize, self.max_scale = float(beta), normalize, float(max_scale)
        # target name -> [(B, A, scaling)] of its active adapters (LoRA), or None (the tensor itself)
        self._factors: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]] | None] = {}
        self._transposed: dict[str, bool] = {}
        self._quantized: dict[str, torch.nn.Module] = {}  # target -> its quantized base layer (QLoRA)
        self._grad_ema: dict[str, torch.Tensor] = {}

    # -- what is perturbed -----------------------------------------------------------------------
    def _targets(self, model):
        owner = self.trainer if self.trainer is not None else model
        if distributed.deepspeed_stage(owner) is not None:
            raise ValueError("MGPOCallback does not support DeepSpeed: it reads the optimizer's momentum per "
                             "parameter, which ZeRO partitions; use DDP")
        layers = lora_layers(model)
        if not layers:
            targets = self._select(model)
            self._factors = dict.fromkeys(targets)
            self._transposed = dict.fromkeys(targets, False)
        else:
            candidates = select_parameters(model, self.include, self.exclude, trainable_only=False,
                                           skip_norm_and_bias=self.skip_norm_and_bias)
            targets, self._factors, self._transposed, self._quantized = {}, {}, {}, {}
            for name, layer in layers.items():
                key = f"{name}.base_layer.weight"
                if key in candidates:
                    targets[key] = candidates[key]
                    self._factors[key] = self._lora_factors(name, layer)
                    self._transposed[key] = bool(getattr(layer, "fan_in_fan_out", False))
                    if quantization(candidates[key]) is not None:
                        self._quantized[key] = layer.base_layer
            if not targets:
                raise ValueError("MGPOCallback: include/exclude leave no LoRA base weight to perturb")
        if is_sharded(targets):
            raise ValueError("MGPOCallback does not support FSDP2 shards: the per-layer direction needs "
                             "whole LoRA factors and their momentum; use DDP")
        return targets

    @staticmethod
    def _lora_factors(name: str, layer) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """(B, A, s) of each active adapter of a plain LoRA linear layer; anything else is refused by name."""
        active = list(layer.active_adapters)
        if not active or any(a not in layer.lora_A for a in active):
            raise ValueError(f"MGPOCallback: LoRA layer {name!r} has an active adapter that is no LoRA "
                             "linear factor pair (an embedding LoRA?); exclude it")
        if any(getattr(layer, "use_dora", {}).get(a, False) for a in active):
            raise ValueError(f"MGPOCallback: LoRA layer {name!r} uses DoRA, whose weight is not "
                             "W₀ + s·B·A")
        out = []
        for adapter in active:
            a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
            if a.dim() != 2:
                raise ValueError(f"MGPOCallback: LoRA layer {name!r} is not a linear layer (factor A of "
                                 f"shape {tuple(a.shape)})")
            out.append((b, a, float(layer.scaling[adapter])))
        return out

    # -- the direction and its size --------------------------------------------------------------
    def _low_rank(self, name: str, pick) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(U, V) with U·V = Σ s·(dB·A + B·dA) for LoRA target ``name``, ``pick`` giving dB, dA (momentum or
        gradient; None if missing): U = [s·dB, s·B] (out × 2r), V = [A; dA] (2r × in), float32 or wider."""
        parts = [(s * b, a, pick(b), pick(a), s) for b, a, s in self._factors[name]]
        if any(db is None or da is None for _, _, db, da, _ in parts):
            return None
        dtype = compute_dtype(*(t.dtype for part in parts for t in part[:4]))
        u = torch.cat([p[4] * p[2] for p in parts] + [p[0] for p in parts], dim=1)
        v = torch.cat([p[1] for p in parts] + [p[3] for p in parts], dim=0)
        return u.detach().to(dtype), v.detach().to(dtype)

    @torch.no_grad()
    def _weight_space_norm(self, name: str, pick) -> torch.Tensor | None:
        """‖v‖ of the tensor ``pick`` (momentum or gradient; None if missing) seen in the target's weight
        space: for a LoRA layer v = Σ s·(dB·A + B·dA), its norm from the factors alone
        (:func:`robustft.ops.perturb.low_rank_tangent_sq_norm`, no out × in matrix); else the tensor's own."""
        if self._factors[name] is None:
            t = pick(self._params[name])
            return None if t is None else torch.linalg.vector_norm(t.detach().to(compute_dtype(t.dtype)))
        uv = self._low_rank(name, pick)
        if uv is None:
            return None
        r = uv[0].shape[1] // 2  # U = [s·dB, s·B], V = [A; dA]
        return low_rank_tangent_sq_norm(uv[0][:, r:], uv[1][:r], uv[0][:, :r], uv[1][r:]).sqrt()

    @staticmethod
    def _product(u: torch.Tensor, v: torch.Tensor, transposed: bool, out: torch.Tensor) -> torch.Tensor:
        """U·V (its transpose for fan_in_fan_out weights) into ``out``: one product of inner size 2r."""
        a, b = (v.T, u.T) if transposed else (u, v)
        return torch.mm(a, b, out=out)

    def _momentum(self, optimizer):
        def pick(p):
            st = optimizer.state.get(p, {}) if hasattr(optimizer, "state") else {}
            return st.get("exp_avg", st.get("momentum_buffer"))

        return pick

    def _contexts(self, weights, rho, state, optimizer):
        if optimizer is None:
            raise ValueError("MGPOCallback: the Trainer passed no optimizer to the callback")
        pick = self._momentum(optimizer)
        contexts, scales = [], []
        for name in self._params:
            norm = self._weight_space_norm(name, pick)
            if norm is None:
                contexts.append(None)
                continue
            if not torch.isfinite(norm):
                self._warn_nonfinite(state, f"momentum of {name!r}", "this layer is not perturbed")
                contexts.append(None)
                continue
            if norm <= 1e-12:
                contexts.append(None)
                continue
            ema = self._grad_ema.get(name) if self.normalize else None
            factor = mgpo_factor(norm, ema, rho, self.max_scale)
            scales.append(-factor * float(norm) / rho)
            contexts.append((name, optimizer, factor))
        if scales:
            self._record("adaptive_scale", sum(scales) / len(scales))
        return contexts

    def _noise(self, index, w, ctx):
        name, optimizer, factor = ctx
        pick = self._momentum(optimizer)
        if self._factors[name] is None:  # a plain tensor: its own momentum
            m = pick(self._params[name]).detach()
            return (m.to(compute_dtype(m.dtype)) * factor).to(w.device)
        u, v = self._low_rank(name, pick)  # not None: the context was made from the same momentum
        transposed = self._transposed[name]
        shape = (v.shape[1], u.shape[0]) if transposed else (u.shape[0], v.shape[1])
        out = self._scratch_for(torch.Size(shape), u.dtype, u.device)  # one buffer for every layer's ε
        return self._product(u, v, transposed, out).mul_(factor).to(w.device)

    @staticmethod
    def _target_of(ctx) -> str:
        return ctx[0]

    # -- ḡ ---------------------------------------------------------------------------------------
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        super().on_pre_optimizer_step(args, state, control, **kwargs)
        for name in self._params:
            norm = self._weight_space_norm(name, lambda p: p.grad)
            if norm is None:
                continue
            if torch.isfinite(norm):
                self._grad_ema[name] = mgpo_grad_ema(self._grad_ema.get(name), norm, self.beta)

    def state_dict(self):
        return ({f"grad_ema.{n}": t.reshape(1) for n, t in self._grad_ema.items()},
                {"beta": self.beta, "rho": self.rho})

    def load_state_dict(self, tensors, meta, source):
        unknown = [k for k in tensors if k[len("grad_ema."):] not in self._params]
        if unknown:
            raise ValueError(f"{source}: {unknown[0]!r} names no tensor this MGPOCallback perturbs")
        self._grad_ema = {k[len("grad_ema."):]: t.to(torch.float64).reshape(()) for k, t in tensors.items()}
