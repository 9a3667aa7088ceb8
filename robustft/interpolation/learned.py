"""Learned per-block interpolation coefficients (aTLAS / layer-wise AdaMerging) on models in memory.

θ = θ_start + Σ_k Σ_b α_{k,b} τ_{k,b} (maths in :mod:`robustft.ops.learned`), with α learned by gradient
descent through ``torch.func.functional_call``: the start model's own tensors and the task vectors are frozen,
only the (K, blocks) coefficients are trained, on labelled examples (``objective="loss"``, aTLAS) or on
unlabelled inputs by mean prediction entropy (``objective="entropy"``, AdaMerging; the entropy is
:func:`robustft.ops.dawin.prediction_entropy`, per sequence for causal LMs as in DaWin). One task vector
is WiSE-FT with a learned α per block; several are multi-task merging.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustft.checks import check_number
from robustft.core.checkpoint import atomic_output_dir, atomic_output_file, atomic_write_text
from robustft.core.model import OBJECTIVES, OPTIMIZERS, call_with_weights, is_causal_lm, minimise
from robustft.core.params import live_tensors, select_parameters, swapped_in
from robustft.lora.io import LoRAAdapter
from robustft.lora.layers import is_lora_b
from robustft.ops.learned import assign_blocks, compose_weights, task_vectors

__all__ = ["OBJECTIVES", "OPTIMIZERS", "LearnedInterpolation", "merge_saved", "read_coefficients"]


#: file names written by :meth:`LearnedInterpolation.save_coefficients`
COEFFICIENTS_FILE = "coefficients.safetensors"
META_FILE = "coefficients.json"


def read_coefficients(path: str | os.PathLike) -> tuple[torch.Tensor, dict[str, Any]]:
    """The (K, blocks) coefficients and the JSON metadata of a folder written by ``save_coefficients``."""
    from safetensors.torch import load_file

    folder = Path(path)
    tensor_path, meta_path = folder / COEFFICIENTS_FILE, folder / META_FILE
    for p in (tensor_path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file (LearnedInterpolation.save_coefficients writes it)")
    meta = json.loads(meta_path.read_text())
    coef = load_file(str(tensor_path)).get("coefficients")
    blocks = meta.get("block_names")
    if coef is None or coef.dim() != 2 or not isinstance(blocks, list) or coef.shape[1] != len(blocks):
        shown = None if coef is None else tuple(coef.shape)
        raise ValueError(f"{tensor_path}: coefficients of shape {shown} do not fit the blocks of {meta_path}")
    return coef.to(torch.float32), meta


class LearnedInterpolation:
    """θ = θ_start + Σ_k Σ_b α_{k,b} τ_{k,b} with the coefficients α learned (aTLAS / AdaMerging).

    ``model`` holds θ_start and is the network that is run (its tensors are read, never written, except
    inside :meth:`save_merged`, where they are swapped back bit-exactly). ``ends`` are the fine-tuned models
    (or their state dicts): τ_k = θ_k − θ_start is computed once for the selected tensors (``include``/
    ``exclude``, floating parameters and buffers), after which the end models may be freed. ``blocks``
    (:func:`robustft.ops.learned.assign_blocks`): ``"tensor"``, ``"layer"``, ``"all"`` or a regular
    expression. ``init``: the starting α (a number for all, or a (K, blocks) tensor); 0.3 is AdaMerging's.

    Memory: the start model (not copied), K task vectors, K × blocks coefficients; each step builds the
    composed θ once for the forward pass (freed after the backward pass), no model copy.
    """

    def __init__(
        self,
        model: nn.Module,
        ends: nn.Module | Mapping[str, torch.Tensor] | Sequence[nn.Module | Mapping[str, torch.Tensor]],
        blocks: str = "tensor",
        init: float | torch.Tensor = 0.3,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
    ):
        if isinstance(ends, (nn.Module, Mapping)):
            ends = [ends]
        ends = list(ends)
        if not ends:
            raise ValueError("ends: no fine-tuned model given; need at least one task vector")
        self.model = model
        self.params = select_parameters(model, include, exclude, trainable_only=False, buffers=True)
        factors = [n for n in self.params if is_lora_b(n)]
        if factors:  # α·(B_end − B_0) on each factor is not α on the delta B·A (α² appears): use from_lora
            raise ValueError(f"model: LoRA factor {factors[0]!r} selected; interpolating factors does not "
                             "scale the delta s·B·A. Pass the base model and the adapters to "
                             "LearnedInterpolation.from_lora, or exclude the factors")
        self.start = {n: t.detach() for n, t in self.params.items()}
        kw = dict(include=include, exclude=exclude, trainable_only=False, buffers=True)
        end_sds = [select_parameters(e, **kw) if isinstance(e, nn.Module) else e for e in ends]
        for k, sd in enumerate(end_sds):
            missing = [n for n in self.start if n not in sd]
            if missing:
                raise ValueError(f"ends[{k}]: has no tensor {missing[0]!r} of the start model "
                                 f"({len(missing)} missing)")
        self.vectors = task_vectors(self.start, [{n: sd[n] for n in self.start} for sd in end_sds])
        self.block_names, self.block_index = assign_blocks(list(self.start), blocks)
        self.blocks = blocks
        shape = (len(self.vectors), len(self.block_names))
        if isinstance(init, torch.Tensor) and init.ndim > 0:
            if tuple(init.shape) != shape:
                raise ValueError(f"init: shape {tuple(init.shape)}, expected (task vectors, blocks) = "
                                 f"{shape}")
            start_coef = init.detach().to(torch.float32).clone()
            if not torch.isfinite(start_coef).all():
                raise ValueError("init: the tensor holds non-finite values")
        else:  # one rule (robustft.checks): real numbers incl. numpy / 0-d torch scalars, never str or bool
            start_coef = torch.full(shape, float(check_number("init", init)))
        self.coefficients = start_coef.to(next(iter(self.start.values())).device)
        self.history: list[float] = []
        self.fit_options: dict[str, Any] = {}

    @classmethod
    def from_lora(
        cls,
        model: nn.Module,
        adapters: Sequence[LoRAAdapter],
        blocks: str = "tensor",
        init: float | torch.Tensor = 0.3,
    ) -> LearnedInterpolation:
        """Coefficients per LoRA module on the deltas s·B_k A_k of K adapters of the base ``model`` (no PEFT).

        τ_k of a module's base weight is adapter k's dense ΔW (transposed for embeddings and
        ``fan_in_fan_out``; zero where adapter k has no such module); only the adapted weights are
        interpolated. With the default ``blocks="tensor"`` each LoRA module gets its own α per adapter. The
        task vectors are kept dense (K × the adapted weights), not as factors.
        """
        adapters = list(adapters)
        if not adapters:
            raise ValueError("adapters: none given; need at least one LoRA adapter")
        modules = dict(model.named_modules())
        weights: dict[str, torch.Tensor] = {}
        deltas: list[dict[str, torch.Tensor]] = [{} for _ in adapters]
        for k, adapter in enumerate(adapters):
            for module, delta in adapter.deltas.items():
                if adapter.kinds.get(module) == "parameter":
                    raise ValueError(f"adapters[{k}]: module {module!r} is a target_parameters LoRA (fused "
                                     "MoE experts): learned coefficients on it are not supported")
                weight = getattr(modules.get(module), "weight", None)
                if weight is None:
                    raise ValueError(f"adapters[{k}]: module {module!r} is not a weighted module of the "
                                     "model (pass the base model, not the PeftModel)")
                dense = delta.dense()
                if adapter.kinds.get(module) == "embedding" or adapter.config.get("fan_in_fan_out"):
                    dense = dense.T
                if tuple(dense.shape) != tuple(weight.shape):
                    raise ValueError(f"adapters[{k}]: module {module!r}: ΔW shape {tuple(dense.shape)} does "
                                     f"not fit the weight {tuple(weight.shape)}")
                weights[f"{module}.weight"] = weight
                deltas[k][f"{module}.weight"] = dense
        ends = [{n: w.detach() + d[n].to(w.dtype) if n in d else w.detach() for n, w in weights.items()}
                for d in deltas]
        include = [f"^{re.escape(n)}$" for n in weights]
        return cls(model, ends, blocks=blocks, init=init, include=include)

    def stored_numel(self) -> int:
        """Extra elements kept: the task vectors and the coefficients (the start is the model's own)."""
        return sum(t.numel() for tau in self.vectors for t in tau.values()) + self.coefficients.numel()

    def weights(self, coefficients: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The composed θ (selected tensors) at ``coefficients`` (default: the current ones)."""
        coef = self.coefficients if coefficients is None else coefficients
        return compose_weights(self.start, self.vectors, coef, self.block_index)

    def _full(self, theta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """θ plus the model's other parameters detached, so nothing but the coefficients gets a gradient."""
        frozen = {n: p.detach() for n, p in self.model.named_parameters()}
        frozen.update(theta)
        return frozen

    def fit(
        self,
        data: Iterable[Any],
        objective: str = "loss",
        steps: int = 100,
        lr: float = 1e-3,
        optimizer: str = "adam",
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        clamp: tuple[float, float] | None = None,
        causal_lm: bool | None = None,
    ) -> torch.Tensor:
        """Learn the coefficients by ``steps`` gradient steps on the batches of ``data`` (cycled).

        ``data``: batches as keyword mappings (``model(**batch)``, Hugging Face style), ``(inputs, *targets)``
        tuples, or input tensors; a DataLoader is re-iterated when exhausted.

        ``objective="loss"``: ``loss_fn(outputs, batch)`` (default: the model's own ``outputs.loss``, i.e.
        batches with labels), aTLAS. ``"entropy"``: the mean prediction entropy of the batch (no labels
        needed; for a causal LM the mean next-token entropy per sequence), AdaMerging. ``optimizer``:
        ``"adam"`` (torch.optim.Adam, AdaMerging's) or ``"sgd"`` (plain α ← α − lr·∇). ``clamp=(lo, hi)``
        clips α after each step (AdaMerging keeps α in [0, 1]). The model runs in its current train/eval mode
        (call ``model.eval()`` for no dropout).
        """
        causal = is_causal_lm(self.model) if causal_lm is None else bool(causal_lm)
        coef = self.coefficients.clone().requires_grad_(True)

        def forward(batch):
            return call_with_weights(self.model, self._full(self.weights(coef)), batch)

        history = minimise([coef], forward, data, objective, steps, lr, optimizer, loss_fn, clamp, causal)
        self.coefficients = coef.detach()
        self.history = history
        self.fit_options = {"objective": objective, "steps": steps, "lr": float(lr), "optimizer": optimizer,
                            "clamp": list(clamp) if clamp is not None else None}
        return self.coefficients.clone()

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """θ at the current coefficients for the selected tensors, in their dtypes (a new tensor each)."""
        return {n: t.detach().clone() for n, t in self.weights().items()}

    def save_coefficients(self, output_dir: str | os.PathLike) -> list[Path]:
        """``coefficients.safetensors`` (the (K, blocks) tensor) and ``coefficients.json`` (blocks, the block
        of every tensor, the fit's options and objective history), each written atomically."""
        from safetensors.torch import save_file

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensor_path, meta_path = out / COEFFICIENTS_FILE, out / META_FILE
        with atomic_output_file(tensor_path) as tmp:
            save_file({"coefficients": self.coefficients.detach().cpu().contiguous()}, str(tmp))
        meta = {
            "task_vectors": len(self.vectors),
            "blocks": self.blocks,
            "block_names": self.block_names,
            "tensor_blocks": dict(zip(self.start, self.block_index, strict=True)),
            "fit": self.fit_options,
            "history": self.history,
        }
        atomic_write_text(meta_path, json.dumps(meta, indent=2))
        return [tensor_path, meta_path]

    def load_coefficients(self, path: str | os.PathLike) -> torch.Tensor:
        """Set the coefficients from a folder of :meth:`save_coefficients` (same tensors and blocks)."""
        coef, meta = read_coefficients(path)
        mine = dict(zip(self.start, self.block_index, strict=True))
        if meta.get("tensor_blocks") != mine or meta.get("block_names") != self.block_names:
            raise ValueError(f"{Path(path) / META_FILE}: saved for other tensors or blocks than this model's "
                             "selection")
        if tuple(coef.shape) != tuple(self.coefficients.shape):
            raise ValueError(f"{Path(path) / COEFFICIENTS_FILE}: coefficients of shape {tuple(coef.shape)}, "
                             f"expected {tuple(self.coefficients.shape)}")
        self.coefficients = coef.to(device=self.coefficients.device, dtype=torch.float32)
        return self.coefficients.clone()

    def save_merged(self, output_dir: str | os.PathLike, overwrite: bool = False, **save_kwargs: Any) -> Path:
        """``model.save_pretrained`` with θ written in, atomically (``atomic_output_dir``); start put back.

        θ is swapped into the model's tensors for the save only (:func:`robustft.core.params.swapped_in`:
        one more
        copy of the selected tensors meanwhile) and the start values are restored bit-exactly, also on error.
        """
        if not hasattr(self.model, "save_pretrained"):
            raise ValueError(f"model: {type(self.model).__name__} has no save_pretrained; save "
                             "merged_state_dict() yourself")
        theta = self.merged_state_dict()
        with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
            with swapped_in(self.params, [theta[n] for n in self.params]):
                self.model.save_pretrained(tmp, **save_kwargs)
        return Path(output_dir)

    @torch.no_grad()
    def apply_to(self, model: nn.Module) -> None:
        """Write θ into another model with the same tensor names (e.g. a fresh copy to evaluate)."""
        target = select_parameters(model, include=None, exclude=None, trainable_only=False, buffers=True)
        missing = [n for n in self.start if n not in target]
        if missing:
            raise ValueError(f"model: has no tensor {missing[0]!r} ({len(missing)} missing)")
        theta = self.weights()
        for live, n in zip(live_tensors({n: target[n] for n in theta}), theta, strict=True):
            live.copy_(theta[n])


def merge_saved(
    start: str | os.PathLike,
    ends: Sequence[str | os.PathLike],
    coefficients: str | os.PathLike,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    max_shard_size: int | str | None = None,
) -> Path:
    """θ = θ_start + Σ_k α_{k,b} τ_k of saved checkpoints, streamed tensor by tensor to ``output_dir``.

    ``coefficients``: a folder written by :meth:`LearnedInterpolation.save_coefficients` (fitted on models in
    memory); ``ends`` in the order of its task vectors. Each tensor of ``start`` listed in the coefficients'
    ``tensor_blocks`` is composed by :func:`robustft.ops.learned.compose_weights` (the same arithmetic as in
    memory), every other tensor is copied. Read with ``CheckpointReader`` and written with ``ShardedWriter``
    (at most 1 + K tensors in memory at a time) into an ``atomic_output_dir``; config and tokenizer files are
    copied from ``start``. Layouts are checked before anything is written.
    """
    from contextlib import ExitStack

    from robustft.merge.io import CheckpointReader, ShardedWriter, copy_side_files

    coef, meta = read_coefficients(coefficients)
    ends = list(ends)
    if len(ends) != coef.shape[0]:
        raise ValueError(f"ends: {len(ends)} checkpoints for {coef.shape[0]} task vectors in {coefficients}")
    tensor_blocks = meta.get("tensor_blocks") or {}
    with ExitStack() as stack:
        ref = stack.enter_context(CheckpointReader(start))
        readers = [stack.enter_context(CheckpointReader(e)) for e in ends]
        composed = [n for n in ref.names if n in tensor_blocks]
        if not composed:
            raise ValueError(f"{coefficients}: none of its tensors is in {start}; fitted on another model?")
        for k, r in enumerate(readers):
            for n in composed:
                info = r.infos.get(n)
                if info is None or info.shape != ref.infos[n].shape:
                    got = None if info is None else info.shape
                    raise ValueError(f"ends[{k}] ({ends[k]}): tensor {n!r} has shape {got}, start has "
                                     f"{ref.infos[n].shape}")
        plan = [(n, ref.infos[n].shape, ref.infos[n].dtype) for n in ref.names]
        with atomic_output_dir(output_dir, overwrite, [start, *ends, coefficients]) as tmp:
            with ShardedWriter(tmp, plan, max_shard_size, metadata=ref.metadata) as writer:
                for n in ref.names:
                    s = ref.get(n)
                    if n in tensor_blocks:
                        b = int(tensor_blocks[n])
                        taus = [{n: r.get(n).to(s.dtype) - s} for r in readers]
                        s = compose_weights({n: s}, taus, coef[:, b : b + 1], [0])[n]
                    writer.write(n, s)
            copy_side_files(start, start, tmp)
    return Path(output_dir)
