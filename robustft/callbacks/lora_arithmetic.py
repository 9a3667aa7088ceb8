"""LoRAArithmeticCallback: at the end of training, compose the fresh adapter with saved ones by a recipe.

The maths lives in :mod:`robustft.lora`; this callback only decides when (``on_train_end``), where
(``<output_dir>/<name>``) and whether to evaluate the composite with the Trainer.

    cb = LoRAArithmeticCallback({"self": 1.0, "adapters/math": 1.0, "adapters/toxic": -0.5})
    trainer = Trainer(model=peft_model, args=args, ..., callbacks=[cb])
    # the Trainer is found when training starts (or pass it with cb.attach(trainer))
    trainer.train()              # -> output_dir/composed/ (a PEFT adapter), cb.metrics

It acts last among the end-of-training actions: ``"self"`` is the adapter as the model finally holds it,
after an average copied in and WiSE-FT's θ(α), whatever the order of the callbacks (docs/composition.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from robustft.callbacks.base import END_COMPOSE, RobustCallback
from robustft.checks import check_bool, check_number
from robustft.core import distributed
from robustft.core.params import is_sharded
from robustft.lora.compose import DENSE_METHODS, check_compatible, compose_adapters
from robustft.lora.io import LoRAAdapter, adapter_from_peft_model, read_adapter, write_adapter

__all__ = ["SELF", "LoRAArithmeticCallback"]

#: the recipe's name for the adapter being trained
SELF = "self"
_METHODS = ("exact", "paper", *DENSE_METHODS)


class LoRAArithmeticCallback(RobustCallback):
    """Compose the freshly trained LoRA adapter with saved adapters at ``on_train_end``.

    ``"self"`` is the trained adapter as the model holds it after the other end-of-training actions
    (an average copied in, then WiSE-FT), see docs/composition.md.

    Args:
        recipe: adapter -> weight, where an adapter is ``"self"`` (the one being trained) or a
            saved PEFT adapter folder; e.g. ``{"self": 1, "skills/a": 1, "toxic": -0.5}``. A list
            of ``(adapter, weight)`` pairs works too. ``"self"`` is added with weight 1 if absent.
        name: sub-folder of ``output_dir`` the composite is written to.
        method: ``"exact"`` (ΔW = Σ w_i ΔW_i), ``"paper"`` (Zhang et al. 2023), or an element-wise
            merge of the dense ΔW_i: ``"ties"``, ``"dare_linear"``, ``"dare_ties"`` (needs ``rank``).
        params: parameters of the merge method (``density``, ``drop_rate``, ``seed``).
        rank: compress the composite to this rank (best rank-r), or the rank for dense merges.
        extras: non-LoRA tensors (a ``modules_to_save`` head): ``"first"`` keeps the trained
            adapter's (default), ``"same"`` requires them equal, ``"drop"`` drops them.
        adapter_name: the PEFT adapter being trained.
        evaluate: evaluate the composite with the Trainer at the end (found when training starts,
            or given with :meth:`attach`).
        eval_dataset: dataset for that evaluation (default: the Trainer's).
        overwrite: replace an existing ``output_dir/name``; otherwise training refuses to start.
    """

    end_phase = END_COMPOSE

    def __init__(
        self,
        recipe: Mapping[str, float] | Sequence[tuple[str, float]],
        name: str = "composed",
        method: str = "exact",
        params: Mapping[str, Any] | None = None,
        rank: int | None = None,
        extras: str = "first",
        adapter_name: str = "default",
        evaluate: bool = False,
        eval_dataset=None,
        overwrite: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        items = list(recipe.items()) if isinstance(recipe, Mapping) else [tuple(x) for x in recipe]
        if not items:
            raise ValueError("recipe: empty; give adapter -> weight, e.g. {'self': 1, 'other': -0.5}")
        for i, entry in enumerate(items):
            if len(entry) != 2:
                raise ValueError(f"recipe: entry {entry!r} is not (adapter, weight)")
            items[i] = (entry[0], check_number(f"recipe: weight of {entry[0]!r}", entry[1]))
        if SELF not in [k for k, _ in items]:
            items.insert(0, (SELF, 1.0))
        if method not in _METHODS:
            raise ValueError(f"method: unknown {method!r}; expected one of {list(_METHODS)}")
        if rank is not None:
            rank = check_number("rank", rank, low=1, integer=True)
        check_bool("evaluate", evaluate)
        check_bool("overwrite", overwrite)
        if not isinstance(adapter_name, str) or not adapter_name:
            raise ValueError(f"adapter_name must be a PEFT adapter name, got {adapter_name!r}")
        if extras not in ("same", "first", "drop"):
            raise ValueError(f"extras: unknown policy {extras!r}; expected 'same', 'first' or 'drop'")
        if not isinstance(name, str) or not name or os.sep in name or name in (".", ".."):
            raise ValueError(f"name: {name!r} must be a plain folder name inside output_dir")
        self.recipe = [(str(k), float(w)) for k, w in items]
        self.name, self.method, self.params, self.rank = name, method, dict(params or {}), rank
        self.extras, self.adapter_name, self.overwrite = extras, adapter_name, overwrite
        self.evaluate_at_end, self.eval_dataset = evaluate, eval_dataset
        # saved adapters are read now, so a typo fails before training, not after it
        self.others: dict[str, LoRAAdapter] = {k: read_adapter(k) for k, _ in self.recipe if k != SELF}
        self.output_path: Path | None = None
        self.metrics: dict[str, float] = {}

    # -- wiring --------------------------------------------------------------------------------
    def _adapters(self, model) -> list[LoRAAdapter]:
        if not hasattr(model, "peft_config") or self.adapter_name not in getattr(model, "peft_config", {}):
            raise ValueError(
                f"LoRAArithmeticCallback: the model has no PEFT adapter {self.adapter_name!r} "
                "(wrap it with peft.get_peft_model, or set adapter_name)"
            )
        # ZeRO-3 keeps partitions: every rank gathers the adapter's tensors to read them
        mine = [p for n, p in model.named_parameters() if f".{self.adapter_name}." in n]
        with distributed.gathered(mine):
            own = adapter_from_peft_model(model, self.adapter_name)
        return [own if k == SELF else self.others[k] for k, _ in self.recipe]

    # -- Trainer events ------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, model=model, **kwargs)
        target = Path(args.output_dir) / self.name
        if target.exists() and not self.overwrite:
            raise FileExistsError(
                f"LoRAArithmeticCallback: {target} exists; pass overwrite=True to replace it"
            )
        if self.evaluate_at_end and is_sharded(dict(model.named_parameters())):
            raise ValueError(
                "LoRAArithmeticCallback(evaluate=True) cannot load a second adapter into an FSDP2-sharded "
                "model; compose under FSDP2 with evaluate=False and evaluate the written adapter afterwards"
            )
        if self.evaluate_at_end and self.trainer is None:
            raise ValueError(
                "LoRAArithmeticCallback(evaluate=True) needs the Trainer: call callback.attach(trainer)"
            )
        check_compatible(self._adapters(model))  # shapes and base models, before any step

    def end_of_training(self, args, state, control, model=None, **kwargs):
        """Compose the adapter the model holds now with the saved ones, write it, evaluate it if asked."""
        adapters = self._adapters(model)
        composed = compose_adapters(
            adapters,
            [w for _, w in self.recipe],
            method=self.method,
            rank=self.rank,
            extras=self.extras,
            params=self.params,
        )
        self.output_path = Path(args.output_dir) / self.name
        if distributed.is_main_process():
            write_adapter(composed, self.output_path, overwrite=self.overwrite)
        distributed.barrier()
        if self.evaluate_at_end:
            # reaches state.log_history through the evaluation's own log
            self.pending_logs[f"{self.name}_max_rank"] = max(d.rank for d in composed.deltas.values())
            self.evaluate(self.trainer, self.eval_dataset)

    def evaluate(self, trainer, eval_dataset=None, metric_key_prefix: str | None = None) -> dict[str, float]:
        """Evaluate the written composite with ``trainer`` (metrics prefixed ``<name>_``), then restore.

        The composite is loaded as a second PEFT adapter and made active; the trained adapter is
        made active again and the composite removed afterwards, also if evaluation raises.
        """
        if self.output_path is None:
            raise ValueError("LoRAArithmeticCallback.evaluate: nothing composed yet (train first)")
        model = trainer.model
        tmp_name = f"robustft_{self.name}"
        previous = model.active_adapter
        model.load_adapter(str(self.output_path), adapter_name=tmp_name, is_trainable=False)
        try:
            model.set_adapter(tmp_name)
            self.metrics = trainer.evaluate(eval_dataset, metric_key_prefix=metric_key_prefix or self.name)
        finally:
            model.set_adapter(previous)
            model.delete_adapter(tmp_name)
        return self.metrics
