"""Which tensors a method touches, copies of them, and swapping copies in and out of a model.

Every callback goes through this module: it selects parameters by name (trainable ones by
default), keeps snapshots on a chosen device/dtype, and swaps them into the live model in a
context manager that always restores. DTensor parameters (FSDP2) and DeepSpeed ZeRO-3 parameters
are handled on their local shard, so nothing here gathers a full model. A ZeRO-3 shard
(``p.ds_tensor``) is a flat 1-D slice of the flattened weight (:func:`zero3_partition`; its padding is
left out): element-wise maths works on it as it is, norms need a sum over ranks
(``distributed.all_reduce_sum``), row-wise maths cuts it at row boundaries
(``ops.perturb.flat_row_sq_norms``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from robustft.checks import compile_patterns

__all__ = [
    "SelectionChangedError",
    "SelectionGuard",
    "Snapshot",
    "check_snapshot_spec",
    "full_shape",
    "is_sharded",
    "is_zero3_param",
    "live_tensors",
    "local_tensor",
    "dequantized_weight",
    "keep_4bit_trainable",
    "quantization",
    "resolve_dtype",
    "restored",
    "select_parameters",
    "swapped_in",
    "train_mode",
    "zero3_partition",
]

_NORM_OR_BIAS = re.compile(r"(^|\.)(bias|[^.]*norm[^.]*|ln[^.]*|layernorm[^.]*)(\.|$)", re.IGNORECASE)


def _as_patterns(option: str, value: str | Sequence[str] | None) -> list[re.Pattern]:
    return compile_patterns(option, value)


def select_parameters(
    model: nn.Module,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    trainable_only: bool = True,
    buffers: bool = False,
    skip_norm_and_bias: bool = False,
) -> dict[str, torch.Tensor]:
    """Name -> tensor for the parameters (and optionally floating buffers) a method acts on.

    ``include``/``exclude`` are regular expressions searched anywhere in the parameter name (``re.search``;
    unlike PEFT's ``target_modules``, which must match a whole module name); each ``include`` pattern must
    match at least one tensor, so a typo fails loudly instead of silently averaging nothing.
    """
    inc = _as_patterns("include", include)
    exc = _as_patterns("exclude", exclude)
    candidates: list[tuple[str, torch.Tensor]] = [
        (n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only
    ]
    if buffers:
        # integer buffers (BatchNorm's num_batches_tracked) are counters, not weights
        candidates += [(n, b) for n, b in model.named_buffers() if b is not None and b.is_floating_point()]
    selected: dict[str, torch.Tensor] = {}
    hits = [0] * len(inc)
    for name, tensor in candidates:
        if inc:
            matched = [i for i, p in enumerate(inc) if p.search(name)]
            for i in matched:
                hits[i] += 1
            if not matched:
                continue
        if any(p.search(name) for p in exc):
            continue
        if skip_norm_and_bias and _NORM_OR_BIAS.search(name):
            continue
        selected[name] = tensor
    for pattern, count in zip(inc, hits):
        if count == 0:
            kind = "trainable parameter" if trainable_only else "parameter"
            raise ValueError(f"include: pattern {pattern.pattern!r} matches no {kind} of the model")
    if not selected:
        raise ValueError(
            "no parameter selected: the model has no trainable parameter matching include/exclude "
            f"(include={include!r}, exclude={exclude!r}, trainable_only={trainable_only})"
        )
    _refuse_zero3_persistent(selected)
    _refuse_replicated_dtensors(selected)
    return selected


def _refuse_replicated_dtensors(selected: Mapping[str, torch.Tensor]) -> None:
    """robustft sums norms over every rank and draws noise per rank: right for disjoint shards (FSDP2,
    ``Shard`` placements), wrong where ranks hold copies (``Replicate``: HSDP's replica dimension, tensor
    parallelism's replicated weights) or partial sums (``Partial``)."""
    for name, t in selected.items():
        if _is_dtensor(t) and not all(pl.is_shard() for pl in t.placements):
            raise ValueError(
                f"{name!r} is a DTensor with placements {tuple(t.placements)} on a {t.device_mesh.ndim}-D "
                "mesh: robustft handles sharded parameters (FSDP2 full sharding, Shard placements), not "
                "replicated or partial ones (HSDP, tensor parallelism), whose norms and random draws "
                "would be wrong across the copies. Use FSDP2 on a 1-D mesh, DDP or DeepSpeed."
            )


def _refuse_zero3_persistent(selected: Mapping[str, torch.Tensor]) -> None:
    """ZeRO-3 keeps small ("persistent") parameters whole between steps and refreshes them from their
    partition only after an optimizer step, so a value written into the partition would not be seen
    by the next forward (an evaluation on swapped-in weights would silently use the live ones)."""
    persistent = [n for n, t in selected.items() if getattr(t, "ds_persist", False)]
    if persistent:
        raise ValueError(
            f"DeepSpeed ZeRO-3 keeps {len(persistent)} selected parameter(s) whole between steps "
            f"(persistent, e.g. {persistent[:3]}); robustft works on ZeRO-3 partitions and needs every "
            "selected parameter partitioned: set zero_optimization.stage3_param_persistence_threshold "
            "to 0 in the DeepSpeed config, or exclude those parameters (exclude=...)"
        )


def is_zero3_param(t: torch.Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter (outside forward empty, or a gathered copy DeepSpeed has not
    released yet; its shard is ``t.ds_tensor``)."""
    return getattr(t, "ds_tensor", None) is not None and hasattr(t, "ds_id")


def is_sharded(params: Mapping[str, torch.Tensor]) -> bool:
    """True when any tensor is a DTensor (FSDP2) or a ZeRO-3 parameter: each rank holds only its shard."""
    return any(_is_dtensor(t) or is_zero3_param(t) for t in params.values())


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "placements")


def zero3_partition(t: torch.Tensor) -> tuple[int, int]:
    """(offset, length) of this rank's slice of a ZeRO-3 parameter's flattened weight, padding excluded.

    DeepSpeed pads the flat weight to a multiple of the world size and gives rank r the elements
    [r·P, (r+1)·P), P = ``t.ds_tensor.ds_numel``; the last ranks' tails (or whole partitions) are padding.
    """
    size = t.ds_tensor.ds_numel
    dist = torch.distributed
    rank = dist.get_rank(group=getattr(t, "ds_process_group", None)) if dist.is_initialized() else 0
    offset = size * rank
    return offset, max(0, min(size, t.ds_numel - offset))


def full_shape(t: torch.Tensor) -> torch.Size:
    """The shape of the whole parameter (a ZeRO-3 parameter is empty outside forward; a DTensor's
    ``shape`` is already global)."""
    return torch.Size(t.ds_shape) if is_zero3_param(t) else t.shape


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank owns, detached: a DTensor's local shard (FSDP2), the valid part of a ZeRO-3
    parameter's flat partition ``ds_tensor`` (DeepSpeed; the parameter itself is empty outside
    forward; see :func:`zero3_partition`), else ``t``."""
    if is_zero3_param(t):
        return t.ds_tensor.detach().narrow(0, 0, zero3_partition(t)[1])
    if _is_dtensor(t):
        t = t.to_local()
    return t.detach()


def quantization(t: torch.Tensor) -> str | None:
    """What quantizes ``t`` (``"bitsandbytes 4-bit (nf4)"``, ``"bitsandbytes 8-bit"``, ``"int8"``...),
    None for a float tensor: a quantized weight (QLoRA's frozen base) cannot take an in-place float update."""
    kind = type(t).__name__
    if kind == "Params4bit":
        state = getattr(t, "quant_state", None)
        return f"bitsandbytes 4-bit ({getattr(state, 'quant_type', None) or getattr(t, 'quant_type', '?')})"
    if kind == "Int8Params" and t.dtype == torch.int8:  # has_fp16_weights=True keeps a float weight
        return "bitsandbytes 8-bit"
    if t.is_floating_point() or t.is_complex():
        return None
    return str(t.dtype).removeprefix("torch.")


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The float32 weight a bitsandbytes 4-bit or 8-bit ``layer`` computes with (bitsandbytes' own
    dequantization; what QLoRA's forward multiplies by), e.g. for row norms of W0 + s·B·A."""
    import bitsandbytes as bnb

    w = layer.weight
    kind = type(w).__name__
    if kind == "Params4bit":
        if getattr(w.quant_state, "packing_format_for_cpu", False):
            raise ValueError(
                f"{type(layer).__name__}: the 4-bit weight is in bitsandbytes' CPU inference layout (the "
                "model ran in eval mode under torch.no_grad); load the model again before training"
            )
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    if kind == "Int8Params":
        scb = getattr(w, "SCB", None)
        scb = scb if scb is not None else getattr(getattr(layer, "state", None), "SCB", None)
        if scb is None:
            raise ValueError(f"{type(layer).__name__}: the 8-bit weight has no row scales (SCB)")
        return bnb.functional.int8_vectorwise_dequant(w.data, scb).float()
    raise ValueError(f"{type(layer).__name__}: weight is not a bitsandbytes 4-bit or 8-bit weight")


def keep_4bit_trainable(model: nn.Module) -> int:
    """Keep bitsandbytes 4-bit layers trainable on CPU; returns how many layers were switched.

    bitsandbytes 0.50.2 repacks a ``Linear4bit``'s CPU weight into an inference layout, for good, at its
    first eval-mode forward without gradients on CPUs with AVX512-BF16 (an evaluation during training), and
    from then on its backward no longer reaches the layer's input: training goes on silently wrong. This
    switches that repacking off on every such layer (``support_avx512bf16_for_cpu = False``, as the LLM
    demo does; only the speed of CPU inference changes) and refuses, naming it, a layer already repacked."""
    switched = 0
    for name, module in model.named_modules():
        if not hasattr(module, "support_avx512bf16_for_cpu"):
            continue
        if getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False):
            raise ValueError(
                f"{name or type(module).__name__}: its 4-bit weight is in bitsandbytes' CPU inference layout "
                "(the model ran in eval mode without gradients, e.g. an evaluation, before training), where "
                "its backward no longer reaches the layer's input; set support_avx512bf16_for_cpu = False "
                "on the Linear4bit modules right after loading, or load the model again (docs/llm.md, "
                "'Quantized bases')"
            )
        if module.support_avx512bf16_for_cpu:
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"float32"``/``torch.float32``/None (keep the parameter's dtype) -> torch dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"dtype: {dtype!r} is not a torch dtype name (e.g. 'float32', 'bfloat16')")
    return resolved


def _shadow_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _resolve_device(device: str | torch.device, name: str = "device") -> torch.device | None:
    if isinstance(device, str) and device == "same":
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name}: {device!r} is not 'same' or a torch device ({err})") from err
    backend = getattr(torch, dev.type, None)
    if dev.type != "cpu" and not (hasattr(backend, "is_available") and backend.is_available()):
        raise ValueError(f"{name}: {device!r} is not 'same', 'cpu' or an available accelerator")
    return dev


def check_snapshot_spec(device: str | torch.device, dtype: str | torch.dtype | None,
                        device_name: str = "device", dtype_name: str = "dtype") -> None:
    """Refuse, when a callback is built, a snapshot device or dtype that :meth:`Snapshot.of` would fail on
    (or that could not hold weights: an integer dtype) once training runs."""
    _resolve_device(device, device_name)
    if isinstance(dtype, str) and dtype == "auto" or dtype is None:
        return
    if not isinstance(dtype, (str, torch.dtype)):
        raise ValueError(f"{dtype_name}: {dtype!r} is not 'auto', None or a torch dtype")
    try:
        resolved = resolve_dtype(dtype)
    except ValueError as err:
        raise ValueError(f"{dtype_name}: {err}") from err
    if not resolved.is_floating_point:
        raise ValueError(f"{dtype_name}: {dtype!r} is not a floating dtype; weights and averages need one "
                         "(e.g. 'float32', 'bfloat16', or 'auto')")


class SelectionChangedError(RuntimeError):
    """A selected tensor was replaced, removed or resized after it was selected (e.g. a new head)."""


class SelectionGuard:
    """The tensors selected from a model when training began, and a check that the model still holds them.

    Callbacks keep references to the selected tensors; a module replaced during training (a new
    head) would leave them averaging, snapshotting or interpolating tensors the model no longer uses.
    """

    def __init__(self, owner: str, model: nn.Module, params: Mapping[str, torch.Tensor]):
        self.owner, self.model = owner, model
        self.params = dict(params)
        self.shapes = {n: tuple(full_shape(t)) for n, t in self.params.items()}

    def check(self) -> None:
        """Raise :class:`SelectionChangedError` naming the first selected tensor that changed."""
        current = dict(self.model.named_parameters())
        current.update((n, b) for n, b in self.model.named_buffers() if n not in current)
        for name, tensor in self.params.items():
            now = current.get(name)
            if now is None:
                why = "is no longer in the model"
            elif now is not tensor:
                why = "was replaced by another tensor (a module swapped during training?)"
            elif tuple(full_shape(now)) != self.shapes[name]:
                why = f"changed shape from {self.shapes[name]} to {tuple(full_shape(now))}"
            else:
                continue
            raise SelectionChangedError(
                f"{self.owner}: parameter {name!r} selected when training began {why}; nothing was written. "
                "Replace modules before training starts (or build a new callback for the new model)."
            )


class Snapshot:
    """Copies of a set of named tensors (their local shards), on a chosen device and dtype.

    ``device="same"`` keeps each copy beside its parameter; ``"cpu"`` offloads. ``dtype=None``
    keeps the parameter dtype; ``"float32"`` casts every copy; ``"auto"`` keeps float32 copies of
    16-bit weights (a shadow that does not lose small updates) and the dtype of the others.
    """

    def __init__(self, names: Sequence[str], tensors: Sequence[torch.Tensor]):
        if len(names) != len(tensors):
            raise ValueError(f"Snapshot: {len(names)} names for {len(tensors)} tensors")
        self.names = list(names)
        self.tensors = list(tensors)

    @classmethod
    def of(
        cls,
        params: Mapping[str, torch.Tensor],
        device: str | torch.device = "same",
        dtype: str | torch.dtype | None = None,
    ) -> Snapshot:
        """Copy ``params`` (local shards) to ``device`` (``"same"``/``"cpu"``/a device) and ``dtype``."""
        dev = _resolve_device(device)
        dt = None if dtype == "auto" else resolve_dtype(dtype)
        copies = []
        with torch.no_grad():
            for t in params.values():
                src = local_tensor(t)
                target = dt or (_shadow_dtype(src.dtype) if dtype == "auto" else src.dtype)
                copies.append(src.to(device=dev or src.device, dtype=target, copy=True))
        return cls(list(params.keys()), copies)

    @classmethod
    def zeros_like(cls, other: Snapshot) -> Snapshot:
        return cls(other.names, [torch.zeros_like(t) for t in other.tensors])

    def __len__(self) -> int:
        return len(self.tensors)

    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    def _check_names(self, params: Mapping[str, torch.Tensor]) -> None:
        if list(params.keys()) != self.names:
            missing = sorted(set(self.names) - set(params))
            extra = sorted(set(params) - set(self.names))
            raise ValueError(
                "snapshot and model disagree on the selected tensors: "
                f"missing in model {missing[:5]}, not in snapshot {extra[:5]}"
            )

    @torch.no_grad()
    def copy_to(self, params: Mapping[str, torch.Tensor]) -> None:
        """Write the snapshot into the live tensors (cast to their dtype/device)."""
        self._check_names(params)
        for p, s in zip(params.values(), self.tensors):
            local_tensor(p).copy_(s)

    @torch.no_grad()
    def copy_from(self, params: Mapping[str, torch.Tensor]) -> None:
        """Overwrite the snapshot with the live tensors."""
        self._check_names(params)
        for p, s in zip(params.values(), self.tensors):
            s.copy_(local_tensor(p))

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {prefix + n: t for n, t in zip(self.names, self.tensors)}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor], prefix: str = "", source: str = "") -> None:
        """Copy saved tensors in; a missing name or a shape change is an error naming the tensor."""
        where = f" in {source}" if source else ""
        for n, t in zip(self.names, self.tensors):
            key = prefix + n
            if key not in state:
                raise ValueError(f"tensor {key!r} missing{where}")
            if tuple(state[key].shape) != tuple(t.shape):
                raise ValueError(
                    f"tensor {key!r}{where} has shape {tuple(state[key].shape)}, expected {tuple(t.shape)}"
                )
            t.copy_(state[key])


def live_tensors(params: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """The local, detached tensors behind ``params``, in order (what fused ops act on)."""
    return [local_tensor(p) for p in params.values()]


@contextmanager
def restored(params: Mapping[str, torch.Tensor], saved: Snapshot | None = None) -> Iterator[Snapshot]:
    """The live values of ``params`` put back bit-exactly on exit, also on error; yields the copy they come
    back from: ``saved`` when the caller already holds one equal to them (no further copy), else one taken
    now beside each tensor."""
    if saved is None:
        saved = Snapshot.of(params)
    else:
        saved._check_names(params)
    lives = live_tensors(params)
    try:
        yield saved
    finally:
        with torch.no_grad():
            for live, s in zip(lives, saved.tensors, strict=True):
                live.copy_(s)


@contextmanager
def swapped_in(
    params: Mapping[str, torch.Tensor], snapshot: Snapshot | Iterable[torch.Tensor]
) -> Iterator[None]:
    """Temporarily put ``snapshot`` into the live tensors; the live values come back on exit, even on error.

    ``snapshot`` is only read: whatever the block does to the model (an in-place edit, an optimizer step)
    never reaches it, and inside the block it still holds what was swapped in. The live values are kept
    in a copy beside each tensor meanwhile (one more copy of ``params``), so the restore is bit-exact. The
    block runs in the caller's grad mode (only the copies are made under ``no_grad``): a gradient at the
    swapped-in weights is a legitimate use, and evaluation loops set their own mode.
    """
    tensors = snapshot.tensors if isinstance(snapshot, Snapshot) else list(snapshot)
    if isinstance(snapshot, Snapshot):
        snapshot._check_names(params)
    lives = live_tensors(params)
    if len(lives) != len(tensors):
        raise ValueError(f"swapped_in: {len(tensors)} tensors for {len(lives)} parameters")
    with restored(params):
        with torch.no_grad():
            for live, s in zip(lives, tensors):
                live.copy_(s)
        yield


@contextmanager
def train_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Every module of ``model`` in train (True) or eval (False) mode for the duration, as
    ``model.train(training)``; on exit each module gets its own mode back (a submodule the user put in
    eval() stays in eval()), also on error. Yields ``model``."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
