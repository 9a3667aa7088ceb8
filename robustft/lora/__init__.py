"""LoRA adapters: exact low-rank algebra (+, -, scalar *, compress(rank)), composition, read and write.

The names below are imported on first use (PEP 562): ``import robustft.lora`` alone imports nothing
heavy, and PEFT is imported only by the functions that load or build a PEFT model.
"""

from typing import TYPE_CHECKING

from robustft._lazy import lazy_exports

if TYPE_CHECKING:  # the same names, for type checkers and IDEs
    from robustft.lora.algebra import DeltaSet, LoRADelta, combine, paper_add, paper_negate
    from robustft.lora.compose import check_compatible, compose_adapters, merge_into_base
    from robustft.lora.io import (
        LoRAAdapter,
        adapter_from_peft_model,
        adapter_from_state_dict,
        read_adapter,
        write_adapter,
    )

__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "robustft.lora.algebra": ("DeltaSet", "LoRADelta", "combine", "paper_add", "paper_negate"),
        "robustft.lora.compose": ("check_compatible", "compose_adapters", "merge_into_base"),
        "robustft.lora.io": (
            "LoRAAdapter",
            "adapter_from_peft_model",
            "adapter_from_state_dict",
            "read_adapter",
            "write_adapter",
        ),
    },
)

__all__ = [
    "DeltaSet",
    "LoRAAdapter",
    "LoRADelta",
    "adapter_from_peft_model",
    "adapter_from_state_dict",
    "check_compatible",
    "combine",
    "compose_adapters",
    "merge_into_base",
    "paper_add",
    "paper_negate",
    "read_adapter",
    "write_adapter",
]
