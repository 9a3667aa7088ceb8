"""Weight perturbations for flat minima: SAM/ASAM ascent steps, momentum and random perturbations.

Pure tensor maths (no Trainer, no PEFT, no I/O). The callbacks in ``robustft.callbacks.sam`` and
``robustft.callbacks.perturbation`` decide when to call them. Conventions:

* a perturbation is a list of tensors ``eps`` added to the weights ``w`` (``w + eps``);
* norms are global (over every tensor of the list) and accept a ``reduce`` hook (e.g.
  ``robustft.core.distributed.all_reduce_sum``) applied to the sum of squares, so sharded tensors
  (FSDP2 local shards) give the norm of the full model;
* everything is computed in float32, or in the tensors' own dtype when it is wider (float64 models
  are perturbed in float64; :func:`compute_dtype`);
* random noise is regenerated from a ``(seed, step, index)`` triple, so it never has to be stored;
* :func:`perturb_` / :func:`unperturb_` add and remove a perturbation *bit-exactly* without a
  parameter-sized buffer: ``fl(fl(w + e) - e)`` differs from ``w`` only on a few elements, whose
  positions and original values are the only thing kept (see :class:`Fixup`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from robustft.ops import Reduce
from robustft.ops.dtypes import compute_dtype

__all__ = [
    "Fixup",
    "flat_row_sq_norms",
    "global_norm",
    "low_rank_merged_row_sq_norms",
    "low_rank_tangent",
    "low_rank_tangent_sq_norm",
    "mgpo_factor",
    "mgpo_grad_ema",
    "momentum_epsilon",
    "noise_seed",
    "perturb_",
    "row_noise",
    "row_sq_norms",
    "rwp_row_scale",
    "sam_epsilon",
    "sam_norm",
    "sam_perturbation",
    "scale_flat_rows_",
    "scheduled_rho",
    "seeded_noise_linear",
    "seeded_normal",
    "shrink_perturb_",
    "unperturb_",
]


def global_norm(tensors: Sequence[torch.Tensor | None], reduce: Reduce | None = None) -> torch.Tensor:
    """‖x‖₂ = sqrt(Σ_t Σ_i x_{t,i}²) over a list of tensors (None counts as zero), computed in float32
    (float64 if a tensor is float64).

    ``reduce`` sums the squared norm across ranks when the tensors are local shards.
    """
    present = [t for t in tensors if t is not None]
    if not present:
        return torch.zeros(())
    dtype = compute_dtype(*(t.dtype for t in present))
    sq = torch.stack([t.detach().to(dtype).pow(2).sum() for t in present]).sum()
    if reduce is not None:
        sq = reduce(sq)
    return sq.sqrt()


def _asam_scale(w: torch.Tensor, eta: float) -> torch.Tensor:
    return w.detach().to(compute_dtype(w.dtype)).abs().add_(eta)


def sam_norm(
    weights: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    adaptive: bool = False,
    eta: float = 0.0,
    reduce: Reduce | None = None,
) -> torch.Tensor:
    """‖T_w g‖₂ with T_w = I (SAM) or T_w = diag(|w| + η) (ASAM): the denominator of the SAM step."""
    if not adaptive:
        return global_norm(grads, reduce)
    scaled = [
        None if g is None else _asam_scale(w, eta) * g.detach().to(compute_dtype(w.dtype, g.dtype))
        for w, g in zip(weights, grads, strict=True)
    ]
    return global_norm(scaled, reduce)


def sam_epsilon(
    w: torch.Tensor,
    g: torch.Tensor | None,
    rho: float,
    norm: torch.Tensor,
    adaptive: bool = False,
    eta: float = 0.0,
) -> torch.Tensor:
    """ε = ρ · T_w² g / (‖T_w g‖₂ + 1e-12) for one tensor (T_w = I for SAM, |w| + η for ASAM), in float32 or
    float64 for float64 tensors (:func:`compute_dtype`).

    The ascent step of SAM (Foret et al., 2021, "Sharpness-Aware Minimization for Efficiently
    Improving Generalization") and ASAM (Kwon et al., 2021); ``norm`` is :func:`sam_norm` over every
    perturbed tensor. The 1e-12 guard is davda54/sam's. Only the direction of g matters: scaling g by
    a constant (gradient clipping by global norm, loss scaling) leaves ε unchanged.
    """
    if g is None:
        return torch.zeros_like(w, dtype=compute_dtype(w.dtype))
    dtype = compute_dtype(w.dtype, g.dtype)
    e = g.detach().to(dtype) * (rho / (norm.to(device=g.device, dtype=dtype) + 1e-12))
    if adaptive:
        e = e * _asam_scale(w, eta).pow(2)
    return e


def sam_perturbation(
    weights: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor | None],
    rho: float,
    adaptive: bool = False,
    eta: float = 0.0,
    reduce: Reduce | None = None,
) -> list[torch.Tensor]:
    """[ε_t] = ρ · T_w² g / ‖T_w g‖ for a list of tensors (see :func:`sam_epsilon`)."""
    norm = sam_norm(weights, grads, adaptive, eta, reduce)
    return [sam_epsilon(w, g, rho, norm, adaptive, eta) for w, g in zip(weights, grads, strict=True)]


def momentum_epsilon(m: torch.Tensor, rho: float, norm: torch.Tensor) -> torch.Tensor:
    """ε = −ρ · v / ‖v‖₂ with v the optimizer's momentum (float32 or wider), ``norm`` = ‖v‖ over all tensors.

    Momentum-SAM (Becker et al., 2024, "Momentum-SAM: Sharpness Aware Minimization without
    Computational Overhead"): the gradient is taken at w − ρ v/‖v‖, where v is the accumulated
    momentum, which the coming step follows; no extra forward/backward is needed.
    """
    dtype = compute_dtype(m.dtype)
    return m.detach().to(dtype) * (-rho / (norm.to(device=m.device, dtype=dtype) + 1e-12))


def low_rank_tangent(
    b: torch.Tensor, a: torch.Tensor, db: torch.Tensor, da: torch.Tensor
) -> torch.Tensor:
    """dB·A + B·dA (out × in, float32 or wider): the first-order change of the product B·A when the factors
    move along (dB, dA), i.e. a direction of the LoRA factors seen in the weight space of W₀ + B·A.

    LoRA-MGPO (Chang et al., EMNLP 2025 Findings, arXiv:2502.14538 v2+) reads the optimizer's momentum of
    the factors (m_B, m_A) and the gradients (∇B, ∇A) this way: ``b`` = s·B, ``db`` = s·m_B (or s·∇B) for a
    layer of scaling s; several adapters: their s·B (and s·dB) side by side and their A (and dA) stacked.
    """
    if b.dim() != 2 or a.dim() != 2 or b.shape != db.shape or a.shape != da.shape or (
        b.shape[1] != a.shape[0]
    ):
        raise ValueError(f"low_rank_tangent: B {tuple(b.shape)}, A {tuple(a.shape)}, dB {tuple(db.shape)} "
                         f"and dA {tuple(da.shape)} do not make dB·A + B·dA")
    dtype = compute_dtype(b.dtype, a.dtype, db.dtype, da.dtype)
    b, a, db, da = (t.detach().to(dtype) for t in (b, a, db, da))
    return db @ a + b @ da


def low_rank_tangent_sq_norm(
    b: torch.Tensor, a: torch.Tensor, db: torch.Tensor, da: torch.Tensor
) -> torch.Tensor:
    """‖dB·A + B·dA‖_F² (float64 scalar) without forming the (out × in) matrix of :func:`low_rank_tangent`.

    With U = [dB, B] (out × 2r) and V = [A; dA] (2r × in), dB·A + B·dA = U·V and ‖U·V‖_F² = Σ (UᵀU) ⊙ (V·Vᵀ):
    two (2r × 2r) Gram matrices, O((out + in)·r²) work instead of O(out·in·r) and an out × in buffer. Equals
    ``low_rank_tangent(...).pow(2).sum()`` to float rounding (LoRA-MGPO's per-layer momentum and gradient
    norms). Computed in float64, clamped at 0.
    """
    if b.dim() != 2 or a.dim() != 2 or b.shape != db.shape or a.shape != da.shape or (
        b.shape[1] != a.shape[0]
    ):
        raise ValueError(f"low_rank_tangent_sq_norm: B {tuple(b.shape)}, A {tuple(a.shape)}, dB "
                         f"{tuple(db.shape)} and dA {tuple(da.shape)} do not make dB·A + B·dA")
    wide = torch.float64
    u = torch.cat([db.detach(), b.detach()], dim=1).to(wide)
    v = torch.cat([a.detach(), da.detach()], dim=0).to(wide)
    return ((u.T @ u) * (v @ v.T)).sum().clamp_min(0)


def mgpo_factor(
    direction_norm: torch.Tensor | float,
    grad_ema: torch.Tensor | float | None,
    rho: float,
    max_scale: float = 10.0,
    eps: float = 1e-12,
) -> float:
    """c with ε = c·v: c = −ρ / (‖v‖ + eps) · min(1 / (ḡ + eps), max_scale), or −ρ / (‖v‖ + eps) before the
    first gradient norm is known (``grad_ema`` None).

    LoRA-MGPO's perturbation of one layer, ε = −ρ · v/‖v‖ · ḡ⁻¹: the direction v is the optimizer's momentum
    (the coming step follows −v, so the gradient is taken ahead along it, as in Momentum-SAM), normalised
    per layer; its size is divided by ḡ, the EMA of that layer's gradient norm (:func:`mgpo_grad_ema`), so
    layers whose gradients are large are perturbed less. The reciprocal is capped at ``max_scale`` (10 in
    the authors' code, llm172/LoRA-MGPO ``lora_mgpo/trainer.py``).
    """
    scale = 1.0 if grad_ema is None else min(1.0 / (float(grad_ema) + eps), max_scale)
    return -rho / (float(direction_norm) + eps) * scale


def mgpo_grad_ema(previous: torch.Tensor | None, grad_norm: torch.Tensor, beta: float) -> torch.Tensor:
    """ḡ_t = β·ḡ_{t−1} + (1 − β)·‖g_t‖, started at the first norm itself (no zero start, no bias correction),
    as the authors' code does; float64 scalar on the CPU."""
    norm = grad_norm.detach().to(device="cpu", dtype=torch.float64).reshape(())
    return norm if previous is None else beta * previous + (1.0 - beta) * norm


def row_sq_norms(t: torch.Tensor) -> torch.Tensor:
    """‖t_{i,:}‖₂² for each row i (dim 0, the output filter of a Linear/Conv); a 1-D tensor is one row."""
    t = t.detach().to(compute_dtype(t.dtype))
    if t.dim() <= 1:
        return t.pow(2).sum().reshape(1)
    return t.reshape(t.shape[0], -1).pow(2).sum(dim=1)


def low_rank_merged_row_sq_norms(w0: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """‖W₀_{i,:} + (B·A)_{i,:}‖₂² for each row i, without forming the (out × in) matrix B·A.

    ‖w₀ᵢ + (BA)ᵢ‖² = ‖w₀ᵢ‖² + 2·Σ_k B_ik (W₀Aᵀ)_ik + Σ_kl B_ik (AAᵀ)_kl B_il: one (out × in × r)
    product W₀Aᵀ and (out × r) work instead of the dense B·A, W₀ + B·A and its squares (several passes
    over an out × in matrix). ``w0`` is (out × in), ``b`` (out × r) and ``a`` (r × in); for a LoRA layer
    b = s·B (several adapters: their s·B side by side and their A stacked). Computed in float32 (or the
    wider dtype of ``w0``) and summed in float64, clamped at 0 (the terms cancel exactly only in exact
    arithmetic); equals :func:`row_sq_norms` of the dense sum to float rounding.
    """
    if w0.dim() != 2 or b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0] or (
        (b.shape[0], a.shape[1]) != tuple(w0.shape)
    ):
        raise ValueError(f"low_rank_merged_row_sq_norms: W0 {tuple(w0.shape)}, B {tuple(b.shape)} and A "
                         f"{tuple(a.shape)} do not make W0 + B·A")
    dtype = compute_dtype(w0.dtype)
    w0, b, a = w0.detach().to(dtype), b.detach().to(dtype), a.detach().to(dtype)
    wide = torch.float64
    cross = ((w0 @ a.T).to(wide) * b.to(wide)).sum(1)  # ⟨w₀ᵢ, (BA)ᵢ⟩
    gram = (a @ a.T).to(wide)
    quad = ((b.to(wide) @ gram) * b.to(wide)).sum(1)  # ‖(BA)ᵢ‖²
    return (row_sq_norms(w0).to(wide) + 2 * cross + quad).clamp_min_(0).to(dtype)


def _row_numel(shape: torch.Size) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else max(math.prod(shape), 1)


def _flat_row_segments(shape: torch.Size, offset: int, length: int) -> list[tuple[int, int, int, int]]:
    """The slice ``[offset, offset + length)`` of a row-major tensor of ``shape`` flattened, cut at row
    boundaries: (first row, rows, start, stop) for its head (end of a cut row), its whole rows, and its
    tail (start of a cut row); start/stop index the slice. A 1-D tensor is one row."""
    n = _row_numel(shape)
    row, pos = offset // n, 0
    segments = []
    head = min(length, -offset % n)
    if head:
        segments.append((row, 1, 0, head))
        row, pos = row + 1, head
    whole = (length - pos) // n
    if whole:
        segments.append((row, whole, pos, pos + whole * n))
        row, pos = row + whole, pos + whole * n
    if pos < length:
        segments.append((row, 1, pos, length))
    return segments


def flat_row_sq_norms(flat: torch.Tensor, shape: torch.Size, offset: int) -> torch.Tensor:
    """This slice's share of :func:`row_sq_norms` of the whole tensor (zero for rows it misses).

    ``flat`` is the slice starting at ``offset`` of the flattened tensor of ``shape`` (a ZeRO-3
    partition); summing the result over slices that cover the tensor (ranks) gives ``row_sq_norms``.
    """
    dtype = compute_dtype(flat.dtype)
    out = torch.zeros(shape[0] if len(shape) > 1 else 1, dtype=dtype, device=flat.device)
    flat = flat.detach().reshape(-1)
    for row, rows, start, stop in _flat_row_segments(shape, offset, flat.numel()):
        out[row : row + rows] += flat[start:stop].to(dtype).reshape(rows, -1).pow(2).sum(dim=1)
    return out


def scale_flat_rows_(
    flat: torch.Tensor, row_scale: torch.Tensor, shape: torch.Size, offset: int
) -> torch.Tensor:
    """Multiply each element of a flat slice (see :func:`flat_row_sq_norms`) by its row's scale, in
    place, segment by segment (no per-element index or scale tensor); returns ``flat``."""
    scale = row_scale.to(device=flat.device, dtype=flat.dtype)
    for row, rows, start, stop in _flat_row_segments(shape, offset, flat.numel()):
        flat[start:stop].view(rows, -1).mul_(scale[row : row + rows, None])
    return flat


def rwp_row_scale(w_sq_rows: torch.Tensor, shape: torch.Size, sigma: float) -> torch.Tensor:
    """std_i = σ · ‖W_{i,:}‖₂ / √n: filter-wise random weight perturbation, n = elements per row.

    ε_{i,j} ~ N(0, σ²/n · ‖W_{i,:}‖²) as in RWP (Li et al., 2024, "Revisiting Random Weight
    Perturbation for Efficiently Improving Generalization") and Flat-LoRA (Li et al., 2025,
    "Flat-LoRA: Low-Rank Adaptation over a Flat Loss Landscape"), where W is the merged weight
    W₀ + s·BA. ``w_sq_rows`` is :func:`row_sq_norms` of that weight.
    """
    return w_sq_rows.sqrt() * (sigma / math.sqrt(_row_numel(shape)))


def noise_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed for tensor ``index`` at ``step``: the same triple regenerates the same noise."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) % (1 << 64)
    x ^= x >> 31
    return x % (1 << 63)


def seeded_normal(
    shape: torch.Size | tuple[int, ...], seed: int, device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """z ~ N(0, I) of ``shape`` from a torch.Generator seeded with ``seed``: the same (shape, seed, device,
    dtype) gives the same z, so noise is regenerated instead of stored (seeds from :func:`noise_seed`).

    ``out``: a contiguous tensor of that shape, dtype and device to draw into (the same z, bit for bit,
    without a fresh allocation: a caller drawing many tensors per step reuses one scratch buffer)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    if out is None:
        return torch.randn(tuple(shape), generator=gen, device=device, dtype=dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"seeded_normal: out is {tuple(out.shape)} {out.dtype}, not a contiguous "
                         f"{tuple(shape)} {dtype}")
    return torch.randn(tuple(shape), generator=gen, device=device, dtype=dtype, out=out)


def row_noise(
    shape: torch.Size,
    row_scale: torch.Tensor,
    seed: int,
    device: torch.device | str = "cpu",
    slice_of: tuple[torch.Size, int] | None = None,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """ε = z ⊙ std (broadcast per row), z ~ N(0, I) of ``dtype`` from a torch.Generator seeded with ``seed``.

    ``slice_of=(full_shape, offset)``: ``shape`` is a flat slice of a larger tensor (a ZeRO-3
    partition) whose rows are those of ``full_shape`` (:func:`scale_flat_rows_`). Deterministic for a
    given (shape, seed, device), so a perturbation can be regenerated to undo it. ``out``: a scratch tensor
    to write ε into (see :func:`seeded_normal`); the same ε bit for bit, without allocating one.
    """
    z = seeded_normal(shape, seed, device, dtype, out=out)
    if slice_of is not None:
        return scale_flat_rows_(z, row_scale, *slice_of)
    scale = row_scale.to(device=device, dtype=dtype)
    if len(shape) <= 1:
        return z.mul_(scale.reshape(()))
    return z.mul_(scale.reshape((-1,) + (1,) * (len(shape) - 1)))


class _SeededNoiseLinear(torch.autograd.Function):
    """x·εᵀ with ε = make() drawn again in the backward instead of kept for it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, make) -> torch.Tensor:
        ctx.make = make
        return torch.nn.functional.linear(x, make().to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.make().to(grad.dtype), None


def seeded_noise_linear(x: torch.Tensor, make) -> torch.Tensor:
    """x·εᵀ for a noise matrix ε = ``make()`` (out × in) that is regenerated for the backward, not stored.

    The output change a perturbation W₀ + ε causes, x·(W₀ + ε)ᵀ − x·W₀ᵀ, for a W₀ that cannot hold ε: a
    quantized base weight (Flat-LoRA on QLoRA). ``make`` must return the same ε each call (seeded, e.g.
    :func:`row_noise`); only ∂/∂x flows (ε is not trained).
    """
    return _SeededNoiseLinear.apply(x, make)


_INT_OF = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_OF[t.element_size()])


def _add(w: torch.Tensor, e: torch.Tensor, sign: float) -> torch.Tensor:
    # the same rounding on the way in and out: compute in float32 (or wider), cast back to w's dtype
    wide = compute_dtype(w.dtype)
    e = e.to(device=w.device, dtype=wide)
    out = w.to(wide).add(e) if sign > 0 else w.to(wide).sub(e)
    return out.to(w.dtype)


@dataclass
class Fixup:
    """Where ``fl(fl(w + e) - e)`` is not ``w`` bit for bit: flat indices and the original values."""

    index: torch.Tensor
    values: torch.Tensor

    def numel(self) -> int:
        return int(self.index.numel())

    def nbytes(self) -> int:
        idx, val = self.index, self.values
        return idx.numel() * idx.element_size() + val.numel() * val.element_size()


@torch.no_grad()
def perturb_(w: torch.Tensor, e: torch.Tensor) -> Fixup:
    """w ← fl(w + e) in place; returns the :class:`Fixup` that makes :func:`unperturb_` bit-exact.

    Floating-point addition is not invertible: where ``w + e`` lands in a coarser binade than ``w``,
    the last bit of ``w`` is lost and ``(w + e) - e`` may differ from ``w``. Instead of a copy of
    ``w``, only those elements are remembered (bit-pattern comparison, so -0.0 vs 0.0 counts): about
    2.6% of the elements at σ = 0.01, 8% at σ = 0.05 (fp32, measured), i.e. 5-17% of the tensor's
    bytes with int32 indices. Transient memory: a few temporaries the size of this one tensor.
    """
    if not torch.is_floating_point(w):
        raise ValueError(f"perturb_: tensor of dtype {w.dtype} is not floating point")
    if tuple(e.shape) != tuple(w.shape):
        raise ValueError(f"perturb_: perturbation shape {tuple(e.shape)} != weight shape {tuple(w.shape)}")
    same = w.dtype == e.dtype == compute_dtype(w.dtype) and w.device == e.device
    if same:  # fl(fl(w + e) − e) in one temporary, then w ← fl(w + e) in place: the same bits as below
        back = torch.add(w, e).sub_(e)
        perturbed = None
    else:
        perturbed = _add(w, e, 1.0)
        back = _add(perturbed, e, -1.0)
    bad = _bits(back) != _bits(w)
    del back
    index = bad.reshape(-1).nonzero().squeeze(1)
    if w.numel() < 2**31:
        index = index.to(torch.int32)
    values = w.reshape(-1)[index.long()].clone()
    if same:
        w.add_(e)
    else:
        w.copy_(perturbed)
    return Fixup(index, values)


@torch.no_grad()
def unperturb_(w: torch.Tensor, e: torch.Tensor, fixup: Fixup) -> None:
    """w ← fl(w − e), then the fixed-up elements get their saved values: exact inverse of :func:`perturb_`."""
    if w.dtype == e.dtype and w.device == e.device:
        w.sub_(e)  # the same rounding as _add(w, e, -1.0), without a temporary
    else:
        w.copy_(_add(w, e, -1.0))
    if fixup.numel():
        w[torch.unravel_index(fixup.index.long(), w.shape)] = fixup.values


@torch.no_grad()
def shrink_perturb_(w: torch.Tensor, shrink: float, sigma: float, seed: int) -> torch.Tensor:
    """θ ← λ·θ + σ·ε in place, ε ~ N(0, I) regenerated from ``seed`` (:func:`seeded_normal`); returns θ.

    Shrink-and-perturb (Ash & Adams, 2020, "On Warm-Starting Neural Network Training", sec. 4): shrinking
    the weights toward zero and adding a little noise restores the plasticity a warm-started model lost.
    Computed in float32 (float64 for float64 weights), written back in θ's dtype.
    """
    dtype = compute_dtype(w.dtype)
    out = w.to(dtype) * shrink
    if sigma:
        out = out + sigma * seeded_normal(w.shape, seed, w.device, dtype)
    w.copy_(out)
    return w


def scheduled_rho(rho: float, schedule: str, step: int, start_step: int, max_steps: int) -> float:
    """ρ_t = ρ (constant) or ρ·(t − t₀ + 1)/(T − t₀) (linear ramp from t₀ to the last step T); 0 before t₀."""
    if step < start_step:
        return 0.0
    if schedule == "constant":
        return rho
    if schedule == "linear":
        span = max(max_steps - start_step, 1)
        return rho * min(1.0, (step - start_step + 1) / span)
    raise ValueError(f"schedule: {schedule!r} is not 'constant' or 'linear'")
