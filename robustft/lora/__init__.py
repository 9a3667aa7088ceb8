"""Low-rank algebra on PEFT LoRA adapters: exact +, -, scalar *, compress(rank); adapter I/O."""

from robustft.lora.algebra import DeltaSet, LoRADelta, combine, paper_add, paper_negate
from robustft.lora.io import (
    LoRAAdapter,
    adapter_from_peft_model,
    adapter_from_state_dict,
    check_compatible,
    compose_adapters,
    merge_into_base,
    read_adapter,
    write_adapter,
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
