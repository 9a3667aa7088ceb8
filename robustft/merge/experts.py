"""MC-SMoE on a transformers MoE model (Li et al., ICLR 2024, "Merge, Then Compress"): the routing statistics
of a data sample, expert neurons aligned by weight matching (Git Re-Basin's solver,
:func:`robustft.merge.align.weight_matching`), each group of experts merged with frequency weights (M-SMoE),
then the merged experts compressed to a low rank (MC-SMoE). The maths is :mod:`robustft.ops.experts`.

Works on the sparse MoE blocks transformers 5 builds with fused experts and a top-k router: a module with a
``gate`` (the router, ``weight`` E x H, returning ``(logits, scores, indices)``) and ``experts`` holding
``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I) (Mixtral, Qwen2/3-MoE, OLMoE). As in the paper the
router is kept: a token routed to any member of a group is computed by the group's merged expert, so the
merged weights are written into every member's slot (the model stays loadable by its own class; the unique
experts, what a deployment stores, are counted in :class:`ExpertMergeReport`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from robustft.ops.experts import dominant_experts, group_experts, low_rank, merge_groups, routing_frequency
from robustft.ops.rebasin import PermAxis, PermutationSpec, apply_permutations

__all__ = ["ExpertMergeReport", "LayerMerge", "align_expert", "merge_experts", "moe_blocks",
           "routing_statistics"]


def moe_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The sparse MoE blocks of ``model`` by name: a ``gate`` router beside ``experts`` with fused 3-D
    ``gate_up_proj``/``down_proj``."""
    out = {}
    for name, m in model.named_modules():
        experts, gate = getattr(m, "experts", None), getattr(m, "gate", None)
        up, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
        if (isinstance(gate, nn.Module) and isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor)
                and up.dim() == 3 and down.dim() == 3):
            if getattr(experts, "is_transposed", False):
                raise ValueError(f"{name}.experts stores its experts as (E, in, out) (is_transposed): "
                                 "not supported")
            out[name] = m
    if not out:
        raise ValueError("the model has no sparse MoE block with fused experts (gate + experts.gate_up_proj)")
    return out


def _batch_mask(batch: object) -> torch.Tensor | None:
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return None if mask is None else mask.reshape(-1).bool()


@torch.no_grad()
def routing_statistics(model: nn.Module,
                       batches: Iterable[Mapping]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """block name -> (router logits T x E, top-k expert indices T x k) over the tokens of ``batches``
    (padding, ``attention_mask`` 0, left out), from a forward hook on each block's router; the hooks are
    removed on every exit."""
    blocks = moe_blocks(model)
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in blocks}

    def hook(name: str):
        def record(module, args, output):
            logits = output[0] if isinstance(output, tuple) else output
            indices = output[2] if isinstance(output, tuple) and len(output) > 2 else None
            if indices is None:
                indices = logits.topk(module.top_k, dim=-1).indices
            seen[name].append((logits.detach().float().cpu(), indices.detach().cpu()))
        return record

    handles = [b.gate.register_forward_hook(hook(n)) for n, b in blocks.items()]
    was_training = model.training
    try:
        model.eval()
        for batch in batches:
            before = {n: len(v) for n, v in seen.items()}
            model(**batch)
            mask = _batch_mask(batch)
            if mask is not None:
                for n in seen:
                    for k in range(before[n], len(seen[n])):
                        logits, idx = seen[n][k]
                        if logits.shape[0] == mask.numel():
                            seen[n][k] = (logits[mask], idx[mask])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for n, parts in seen.items():
        if not parts:
            raise ValueError(f"routing_statistics: block {n!r} saw no tokens (empty batches?)")
        out[n] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return out


#: one permutation of an expert's I hidden neurons: rows of gate_up (its gate and up halves alike) and
#: columns of down
_SPEC_AXES = (PermAxis("gate_up", 0, 1, 2), PermAxis("down", 1))


def align_expert(reference: Mapping[str, torch.Tensor], expert: Mapping[str, torch.Tensor],
                 seed: int = 0) -> dict[str, torch.Tensor]:
    """``expert`` (``gate_up`` 2I x H, ``down`` H x I) with its hidden neurons permuted to match
    ``reference``'s: the permutation maximising Σ ⟨reference, permuted expert⟩ over both matrices (weight
    matching, one linear assignment)."""
    from robustft.merge.align import weight_matching

    spec = PermutationSpec({"hidden": expert["down"].shape[1]}, {"hidden": _SPEC_AXES})
    perms, _ = weight_matching(spec, reference, expert, seed=seed)
    return apply_permutations(spec, perms, dict(expert))


@dataclass
class LayerMerge:
    """One block's merge: routing ``frequency`` (E), the ``dominant`` experts and each expert's ``group``."""

    frequency: list[float]
    dominant: list[int]
    group: list[int]


@dataclass
class ExpertMergeReport:
    """What :func:`merge_experts` did: per block its :class:`LayerMerge`, and the expert parameters a
    deployment stores before and after (unique experts; low-rank factors counted as r·(in + out))."""

    layers: dict[str, LayerMerge] = field(default_factory=dict)
    expert_params_before: int = 0
    expert_params_after: int = 0

    @property
    def ratio(self) -> float:
        """Stored expert parameters after / before."""
        return self.expert_params_after / self.expert_params_before


def _matrix_params(shape: tuple[int, int], rank: int | None) -> int:
    out, inp = shape
    return out * inp if rank is None or rank * (out + inp) >= out * inp else rank * (out + inp)


@torch.no_grad()
def merge_experts(model: nn.Module, batches: Iterable[Mapping], keep: int, rank: int | None = None,
                  align: bool = True, seed: int = 0) -> ExpertMergeReport:
    """MC-SMoE in place: in every MoE block keep ``keep`` dominant experts, merge the others into them
    (router-logit similarity, frequency weights, neurons aligned first unless ``align=False``); with
    ``rank``, each merged expert's gate, up and down matrices become their best rank-``rank`` approximations
    (MC-SMoE; without it M-SMoE). ``batches``: the data sample (model inputs), read once."""
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ValueError(f"rank must be a positive integer or None, got {rank!r}")
    stats = routing_statistics(model, batches)
    report = ExpertMergeReport()
    for name, block in moe_blocks(model).items():
        up, down = block.experts.gate_up_proj, block.experts.down_proj
        experts = up.shape[0]
        logits, indices = stats[name]
        freq = routing_frequency(indices, experts)
        dominant = dominant_experts(freq, keep)
        groups = group_experts(logits, dominant)
        ups, downs = up.detach().clone(), down.detach().clone()
        if align:
            for i, d in enumerate(groups):
                if i != d:
                    moved = align_expert({"gate_up": ups[d], "down": downs[d]},
                                         {"gate_up": ups[i], "down": downs[i]}, seed)
                    ups[i], downs[i] = moved["gate_up"], moved["down"]
        merged_up, merged_down = merge_groups(ups, groups, freq), merge_groups(downs, groups, freq)
        half = up.shape[1] // 2
        for d in merged_up:
            if rank is not None:  # gate and up are two matrices fused along their rows
                merged_up[d] = torch.cat([low_rank(merged_up[d][:half], rank),
                                          low_rank(merged_up[d][half:], rank)])
                merged_down[d] = low_rank(merged_down[d], rank)
        for i, d in enumerate(groups):
            up[i].copy_(merged_up[d])
            down[i].copy_(merged_down[d])
        report.layers[name] = LayerMerge([float(f) for f in freq], dominant, groups)
        per_expert = 2 * half * up.shape[2] + down.shape[1] * down.shape[2]
        report.expert_params_before += experts * per_expert
        report.expert_params_after += keep * (2 * _matrix_params((half, up.shape[2]), rank)
                                              + _matrix_params(tuple(down.shape[1:]), rank))
    return report
