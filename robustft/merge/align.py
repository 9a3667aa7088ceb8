"""Git Re-Basin alignment of whole models: permute B's hidden units to match A, then merge or interpolate.

Weight matching (Ainsworth et al., "Git Re-Basin: Merging Models Modulo Permutation Symmetries", ICLR 2023,
Algorithm 1): visit the permutations in a random order, solve each one's linear assignment
(``scipy.optimize.linear_sum_assignment`` on :func:`robustft.ops.rebasin.matching_cost`) with the others
fixed, and repeat until a whole sweep improves none. Which units may move is a permutation spec built per
model family from tensor names and the config:

- ``mlp``: a chain of Linear layers (``nn.Sequential`` of Linear + parameter-free activations): the
  outputs of every hidden Linear (weight rows, bias) and the inputs of the next (weight columns).
- ``llama`` (also mistral, qwen2, qwen3): per block, the MLP's hidden units (gate_proj/up_proj rows,
  down_proj columns) and the attention heads as whole key-value groups (k/v rows in head blocks, the
  group's query heads' q rows and o_proj columns with them); RoPE acts per head, so this is exact.
- ``gpt2``: per block, c_fc/c_proj hidden units (Conv1D stores weights as [in, out]) and whole heads of
  the fused c_attn (q|k|v) with c_proj's rows.
- ``bert``: per layer, intermediate/output dense hidden units and whole self-attention heads.

The residual stream (embeddings, norms, the hidden size) is left alone, so the aligned model computes
the same function as B. Unknown families and differing shapes raise before anything is written.

Activation matching (the paper's Sec. 3.1, :func:`activation_matching`, in memory on two ``nn.Module``s):
run both models on the same data sample, take each permutation's units where a Linear (or GPT-2 Conv1D)
reads them (the input of ``down_proj``/``c_proj``/``output.dense``/``o_proj``, or of the next Linear of an
MLP: post-activation), correlate every unit of A with every unit of B (Pearson, over the samples and
tokens; ``attention_mask`` drops padding) and solve one linear assignment per permutation, with no
coordinate descent: a unit's activations do not depend on how the other units are ordered.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from robustft.checks import check_integer, check_number
from robustft.core.checkpoint import atomic_output_dir, check_output_dir
from robustft.core.model import as_batches, call_with_weights
from robustft.core.params import train_mode
from robustft.merge.interpolate import check_same_layout
from robustft.merge.io import CheckpointReader, ShardedWriter, copy_side_files
from robustft.ops.rebasin import (
    CrossMoments,
    PermAxis,
    PermutationSpec,
    apply_permutations,
    check_spec,
    identity_permutations,
    matching_cost,
    unit_activations,
)

__all__ = [
    "FAMILIES",
    "AlignResult",
    "UnalignableError",
    "activation_matching",
    "align_checkpoints",
    "align_models",
    "align_state_dicts",
    "permutation_spec",
    "unit_readers",
    "weight_matching",
]

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
FAMILIES = ("mlp", "llama", "gpt2", "bert")


class UnalignableError(ValueError):
    """The two models cannot be aligned (unknown family, differing layouts, a spec that does not fit)."""


def _mlp_spec(shapes: Mapping[str, tuple[int, ...]]) -> PermutationSpec:
    """The hidden units between consecutive Linear layers of an ``nn.Sequential`` state dict ("K.weight")."""
    layers: dict[int, str] = {}
    prefix = None
    for name, shape in shapes.items():
        m = re.fullmatch(r"(.*?)(\d+)\.(weight|bias)", name)
        if m is None or (prefix is not None and m.group(1) != prefix):
            raise UnalignableError(
                f"tensor {name!r} is not a Linear of one nn.Sequential ('<index>.weight'/'<index>.bias'): "
                f"give family= one of {FAMILIES} for a transformer"
            )
        prefix = m.group(1)
        if m.group(3) == "weight":
            if len(shape) != 2:
                raise UnalignableError(
                    f"tensor {name!r} has shape {tuple(shape)}: only Linear layers are handled"
                )
            layers[int(m.group(2))] = f"{prefix}{m.group(2)}"
    for name in shapes:
        m = re.fullmatch(r"(.*?)(\d+)\.bias", name)
        if m and int(m.group(2)) not in layers:
            raise UnalignableError(f"tensor {name!r} is a bias without a weight")
    chain = [layers[k] for k in sorted(layers)]
    if len(chain) < 2:
        raise UnalignableError(f"an MLP needs two Linear layers to have hidden units, found {len(chain)}")
    sizes, axes = {}, {}
    for i, (cur, nxt) in enumerate(zip(chain, chain[1:], strict=False)):
        n = shapes[f"{cur}.weight"][0]
        if shapes[f"{nxt}.weight"][1] != n:
            raise UnalignableError(
                f"{nxt}.weight has {shapes[f'{nxt}.weight'][1]} inputs but {cur}.weight has {n} outputs: "
                "not a chain of Linear layers"
            )
        found = [PermAxis(f"{cur}.weight", 0), PermAxis(f"{nxt}.weight", 1)]
        if f"{cur}.bias" in shapes:
            found.append(PermAxis(f"{cur}.bias", 0))
        sizes[f"hidden{i}"], axes[f"hidden{i}"] = n, tuple(found)
    return PermutationSpec(sizes, axes)


def _blocks(shapes: Mapping[str, tuple[int, ...]], pattern: str) -> list[str]:
    """The prefixes (``model.layers.3.``) of the tensor names matching ``(prefix)pattern``, in layer order."""
    found = {}
    for name in shapes:
        m = re.fullmatch(rf"(.*?\.(\d+)\.){pattern}", name)
        if m:
            found[int(m.group(2))] = m.group(1)
    return [found[k] for k in sorted(found)]


def _with_bias(shapes, axes: list[PermAxis]) -> tuple[PermAxis, ...]:
    """``axes`` plus the bias (dim 0) of every listed output weight (dim 0) that has one."""
    out = list(axes)
    for a in axes:
        bias = a.tensor.removesuffix("weight") + "bias"
        if a.dim == 0 and a.tensor.endswith("weight") and bias in shapes:
            out.append(PermAxis(bias, 0, a.block, a.outer))
    return tuple(out)


def _heads(config: Mapping, hidden: int) -> tuple[int, int, int]:
    """(query heads, key-value heads, head_dim) from a transformers config dict."""
    heads = config.get("num_attention_heads") or config.get("n_head")
    if not heads:
        raise UnalignableError("config has no num_attention_heads: cannot permute attention heads")
    kv = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    if heads % kv:
        raise UnalignableError(f"config: {heads} attention heads are not a multiple of {kv} key-value heads")
    return heads, kv, head_dim


def _llama_spec(shapes, config: Mapping) -> PermutationSpec:
    sizes, axes = {}, {}
    blocks = _blocks(shapes, r"mlp\.gate_proj\.weight")
    if not blocks:
        raise UnalignableError("no '<prefix>.<layer>.mlp.gate_proj.weight' tensor: not a Llama-family model")
    heads, kv, head_dim = _heads(config, config.get("hidden_size", 0))
    group = heads // kv  # query heads per key-value head: they move with it (GQA)
    for i, pre in enumerate(blocks):
        mlp = [
            PermAxis(f"{pre}mlp.gate_proj.weight", 0),
            PermAxis(f"{pre}mlp.up_proj.weight", 0),
            PermAxis(f"{pre}mlp.down_proj.weight", 1),
        ]
        sizes[f"layer{i}.mlp"], axes[f"layer{i}.mlp"] = shapes[mlp[0].tensor][0], _with_bias(shapes, mlp)
        attn = [
            PermAxis(f"{pre}self_attn.q_proj.weight", 0, group * head_dim),
            PermAxis(f"{pre}self_attn.k_proj.weight", 0, head_dim),
            PermAxis(f"{pre}self_attn.v_proj.weight", 0, head_dim),
            PermAxis(f"{pre}self_attn.o_proj.weight", 1, group * head_dim),
        ]
        sizes[f"layer{i}.heads"], axes[f"layer{i}.heads"] = kv, _with_bias(shapes, attn)
    return PermutationSpec(sizes, axes)


def _gpt2_spec(shapes, config: Mapping) -> PermutationSpec:
    sizes, axes = {}, {}
    blocks = _blocks(shapes, r"mlp\.c_fc\.weight")
    if not blocks:
        raise UnalignableError("no '<prefix>.<layer>.mlp.c_fc.weight' tensor: not a GPT-2 model")
    hidden = config.get("n_embd") or config.get("hidden_size", 0)
    heads, _, head_dim = _heads(config, hidden)
    for i, pre in enumerate(blocks):  # Conv1D weights are [in, out]
        mlp = (
            PermAxis(f"{pre}mlp.c_fc.weight", 1),
            PermAxis(f"{pre}mlp.c_fc.bias", 0),
            PermAxis(f"{pre}mlp.c_proj.weight", 0),
        )
        sizes[f"layer{i}.mlp"], axes[f"layer{i}.mlp"] = shapes[mlp[0].tensor][1], mlp
        attn = (
            PermAxis(f"{pre}attn.c_attn.weight", 1, head_dim, 3),
            PermAxis(f"{pre}attn.c_attn.bias", 0, head_dim, 3),
            PermAxis(f"{pre}attn.c_proj.weight", 0, head_dim),
        )
        sizes[f"layer{i}.heads"], axes[f"layer{i}.heads"] = heads, attn
    return PermutationSpec(sizes, axes)


def _bert_spec(shapes, config: Mapping) -> PermutationSpec:
    sizes, axes = {}, {}
    blocks = _blocks(shapes, r"intermediate\.dense\.weight")
    if not blocks:
        raise UnalignableError("no '<prefix>.<layer>.intermediate.dense.weight' tensor: not a BERT model")
    heads, _, head_dim = _heads(config, config.get("hidden_size", 0))
    for i, pre in enumerate(blocks):
        mlp = [PermAxis(f"{pre}intermediate.dense.weight", 0), PermAxis(f"{pre}output.dense.weight", 1)]
        sizes[f"layer{i}.mlp"], axes[f"layer{i}.mlp"] = shapes[mlp[0].tensor][0], _with_bias(shapes, mlp)
        attn = [PermAxis(f"{pre}attention.self.{k}.weight", 0, head_dim) for k in ("query", "key", "value")]
        attn.append(PermAxis(f"{pre}attention.output.dense.weight", 1, head_dim))
        sizes[f"layer{i}.heads"], axes[f"layer{i}.heads"] = heads, _with_bias(shapes, attn)
    return PermutationSpec(sizes, axes)


def _family(config: Mapping | None) -> str:
    if config is None:
        return "mlp"
    model_type = config.get("model_type")
    if model_type in LLAMA_TYPES:
        return "llama"
    if model_type in ("gpt2", "bert"):
        return model_type
    raise UnalignableError(
        f"model_type {model_type!r} is not an alignable family (llama: {', '.join(LLAMA_TYPES)}; gpt2; bert; "
        "or an nn.Sequential MLP without a config)"
    )


def permutation_spec(
    shapes: Mapping[str, tuple[int, ...]], config: Mapping | None = None, family: str | None = None
) -> PermutationSpec:
    """The permutation spec of a model from its tensor shapes and transformers config dict (``family`` from
    the config's model_type when not given; no config: an ``nn.Sequential`` MLP), checked on the shapes."""
    if config is not None and hasattr(config, "to_dict"):  # a transformers PretrainedConfig
        config = config.to_dict()
    family = family or _family(config)
    if family not in FAMILIES:
        raise UnalignableError(f"family: {family!r} is not one of {FAMILIES}")
    if family != "mlp" and config is None:
        raise UnalignableError(f"family {family!r} needs the model's config (heads, head_dim)")
    builder = {"mlp": _mlp_spec, "llama": _llama_spec, "gpt2": _gpt2_spec, "bert": _bert_spec}[family]
    spec = builder(shapes) if family == "mlp" else builder(shapes, config)
    try:
        check_spec(spec, shapes)
    except ValueError as err:
        raise UnalignableError(f"{family} permutation spec does not fit the model: {err}") from err
    return spec


def weight_matching(
    spec: PermutationSpec,
    reference: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    seed: int = 0,
    max_iter: int = 100,
) -> tuple[dict[str, torch.Tensor], int]:
    """Permutations of ``model``'s units maximising Σ ⟨reference, permuted model⟩ over the spec's tensors, by
    coordinate ascent (Ainsworth et al. 2023, Algorithm 1); returns (permutations, sweeps). A sweep visits
    every permutation in a random order (``seed``); it stops after a sweep that improves none."""
    from scipy.optimize import linear_sum_assignment

    seed, max_iter = _check_search(seed, max_iter)

    rng = random.Random(seed)
    perms = identity_permutations(spec)
    names = list(spec.sizes)
    for sweep in range(1, max_iter + 1):
        improved = False
        for name in rng.sample(names, len(names)):
            cost = matching_cost(spec, name, perms, reference, model)
            _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            n = torch.arange(len(new))
            gain = cost[n, new].sum() - cost[n, perms[name]].sum()
            if gain > 1e-12 * cost.abs().sum().clamp_min(1.0):
                perms[name] = new
                improved = True
        if not improved:
            return perms, sweep
    return perms, max_iter


def unit_readers(model: nn.Module, spec: PermutationSpec) -> dict[str, tuple[str, PermAxis]]:
    """Permutation -> (module, axis) of the layer that reads its units as its input features: an
    ``nn.Linear`` whose weight's dim 1 the permutation reorders, or a GPT-2 ``Conv1D`` (weight [in, out])
    whose dim 0 it reorders. Its input is what activation matching correlates."""
    modules = dict(model.named_modules())
    out = {}
    for name, axes in spec.axes.items():
        for axis in axes:
            owner = axis.tensor.removesuffix(".weight")
            module = modules.get(owner) if axis.tensor.endswith(".weight") else None
            if (isinstance(module, nn.Linear) and axis.dim == 1) or (
                    type(module).__name__ == "Conv1D" and axis.dim == 0):
                out[name] = (owner, axis)
                break
        else:
            raise UnalignableError(f"permutation {name!r}: no Linear/Conv1D of the model reads its units "
                                   "(activation matching needs one; use weight matching)")
    return out


def _token_rows(x: torch.Tensor, batch: object) -> torch.Tensor:
    """The rows of ``x`` (..., features) that are real tokens: a (B, T, F) input of a batch with a (B, T)
    ``attention_mask`` keeps the unmasked tokens only; anything else keeps every row."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def _capture(model: nn.Module, readers: Mapping[str, tuple[str, PermAxis]], batch: object
             ) -> dict[str, torch.Tensor]:
    """Each reader module's input on ``batch`` (forward pre-hooks, removed on every exit path)."""
    seen: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    handles = []
    try:
        for owner in {o for o, _ in readers.values()}:
            def hook(_module, args, owner=owner):
                seen[owner] = args[0].detach()
            handles.append(modules[owner].register_forward_pre_hook(hook))
        with torch.no_grad():
            call_with_weights(model, {}, batch)  # its own weights
    finally:
        for h in handles:
            h.remove()
    return seen


def activation_matching(
    spec: PermutationSpec, reference: nn.Module, model: nn.Module, data: object
) -> dict[str, torch.Tensor]:
    """Permutations of ``model``'s units maximising Σ_i corr(reference unit i, model unit π(i)) of their
    activations on ``data`` (one batch or an iterable of batches, read once; both models run in eval mode
    on each batch), one linear assignment per permutation (Ainsworth et al. 2023, Sec. 3.1). A unit of
    ``block`` entries (an attention head) sums the correlations of its entries, entry k with entry k."""
    from scipy.optimize import linear_sum_assignment

    readers = unit_readers(model, spec)
    unit_readers(reference, spec)
    moments = {n: CrossMoments(spec.sizes[n], a.outer * a.block) for n, (_, a) in readers.items()}
    with train_mode(reference, False), train_mode(model, False):
        for batch in as_batches(data):
            xa, xb = _capture(reference, readers, batch), _capture(model, readers, batch)
            for name, (owner, axis) in readers.items():
                n = spec.sizes[name]
                moments[name].update(unit_activations(_token_rows(xa[owner], batch), axis, n),
                                     unit_activations(_token_rows(xb[owner], batch), axis, n))
    perms = {}
    for name, m in moments.items():
        _, cols = linear_sum_assignment(m.correlation().numpy(), maximize=True)
        perms[name] = torch.as_tensor(cols, dtype=torch.long)
    return perms


def align_models(
    reference: nn.Module,
    model: nn.Module,
    method: str = "weight",
    data: object = None,
    family: str | None = None,
    seed: int = 0,
    max_iter: int = 100,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``model``'s state dict with its units permuted to match ``reference`` (same function as ``model``)
    and the permutations: ``method="weight"`` (weight matching, Algorithm 1) or ``"activation"``
    (:func:`activation_matching` on ``data``); the spec from the state dict and ``model.config``."""
    if method not in ("weight", "activation"):
        raise ValueError(f"method must be 'weight' or 'activation', got {method!r}")
    if method == "activation" and data is None:
        raise ValueError("data: activation matching needs a data sample (a batch or batches)")
    a, b = reference.state_dict(), model.state_dict()
    _check_shapes({k: tuple(v.shape) for k, v in a.items()}, {k: tuple(v.shape) for k, v in b.items()})
    config = getattr(model, "config", None)
    spec = permutation_spec({k: tuple(v.shape) for k, v in b.items()}, config, family)
    if method == "weight":
        perms, _ = weight_matching(spec, a, b, seed, max_iter)
    else:
        perms = activation_matching(spec, reference, model, data)
    return apply_permutations(spec, perms, b), perms


def _check_search(seed: object, max_iter: object) -> tuple[int, int]:
    """(seed, max_iter) checked: an integer seed and at least one sweep (0 or fewer would copy the model
    unaligned)."""
    return check_integer("seed", seed), check_number("max_iter", max_iter, low=1, integer=True)


def align_state_dicts(
    reference: Mapping[str, torch.Tensor],
    model: Mapping[str, torch.Tensor],
    config: Mapping | None = None,
    family: str | None = None,
    seed: int = 0,
    max_iter: int = 100,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``model``'s state dict with its hidden units permuted to match ``reference`` (same function as
    ``model``), and the permutations; see :func:`permutation_spec` for ``config``/``family``."""
    _check_shapes(
        {k: tuple(v.shape) for k, v in reference.items()}, {k: tuple(v.shape) for k, v in model.items()}
    )
    spec = permutation_spec({k: tuple(v.shape) for k, v in model.items()}, config, family)
    perms, _ = weight_matching(spec, reference, model, seed, max_iter)
    return apply_permutations(spec, perms, model), perms


def _check_shapes(a: Mapping[str, tuple], b: Mapping[str, tuple]) -> None:
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        raise UnalignableError(f"the models have different tensors (e.g. {only[0]!r}): cannot align them")
    for k in a:
        if tuple(a[k]) != tuple(b[k]):
            raise UnalignableError(
                f"tensor {k!r}: shape {tuple(a[k])} in reference but {tuple(b[k])} in model"
            )


@dataclass
class AlignResult:
    """What :func:`align_checkpoints` wrote: the folder, the family, the sweeps and the units that moved."""

    out_dir: Path
    family: str
    sweeps: int
    moved: dict[str, int] = field(default_factory=dict)  # permutation -> units not left in place
    seconds: float = 0.0


def _config(path: Path) -> dict | None:
    folder = path if path.is_dir() else path.parent
    file = folder / "config.json"
    return json.loads(file.read_text()) if file.is_file() else None


def align_checkpoints(
    reference: str | os.PathLike,
    model: str | os.PathLike,
    out: str | os.PathLike,
    family: str | None = None,
    seed: int = 0,
    max_iter: int = 100,
    overwrite: bool = False,
) -> AlignResult:
    """Write ``model`` with its hidden units permuted to match ``reference`` (Git Re-Basin weight matching) to
    ``out``: same tensors, shard layout, config and tokenizer as ``model``; the permutations in
    ``robustft_align.json``. Everything is checked (layout, family, spec) before the output is created.

    Memory: the spec's tensors of both models (the MLP and attention weights) are held during matching."""
    start = time.perf_counter()
    _check_search(seed, max_iter)
    check_output_dir(out, overwrite, [reference, model])
    ref, mod = CheckpointReader(reference), CheckpointReader(model)
    try:
        check_same_layout(ref, mod, ("reference", "model"))
    except ValueError as err:
        raise UnalignableError(str(err)) from err
    shapes = {n: i.shape for n, i in mod.infos.items()}
    config = _config(mod.path)
    family = family or _family(config)
    spec = permutation_spec(shapes, config, family)
    used = spec.by_tensor()
    for name in used:
        if not mod.infos[name].dtype.is_floating_point:
            raise UnalignableError(f"tensor {name!r} is {mod.infos[name].dtype}, not floating point")
    a = {n: ref.get(n) for n in used}
    b = {n: mod.get(n) for n in used}
    perms, sweeps = weight_matching(spec, a, b, seed, max_iter)
    del a
    aligned = apply_permutations(spec, perms, b)
    moved = {k: int((p != torch.arange(len(p))).sum()) for k, p in perms.items()}
    info = {
        "reference": str(ref.path),
        "model": str(mod.path),
        "family": family,
        "seed": seed,
        "sweeps": sweeps,
        "moved": moved,
        "permutations": {k: p.tolist() for k, p in perms.items()},
    }
    plan = [(n, i.shape, i.dtype) for n, i in mod.infos.items()]
    shards = {n: i.file.name for n, i in mod.infos.items()}
    with atomic_output_dir(out, overwrite, [reference, model]) as tmp:
        with ShardedWriter(tmp, plan, None, {**mod.metadata, "aligned_by": "robustft"}, shards) as writer:
            for name, _, _ in plan:
                writer.write(name, aligned[name] if name in aligned else mod.get(name))
        copy_side_files(mod.folder, mod.folder, tmp)
        (tmp / "robustft_align.json").write_text(json.dumps(info, indent=2) + "\n")
    return AlignResult(Path(out), family, sweeps, moved, time.perf_counter() - start)
