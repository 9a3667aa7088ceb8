"""Launched by tests/examples/test_sft_lora_llm.py with ``accelerate launch --config_file <yaml>``: the LLM
example under FSDP2 or DeepSpeed on CPU ranks.

argv: ``fsdp|deepspeed`` then the example's own arguments. accelerate runs neither on a machine without
a GPU (FSDP silently becomes DDP; DeepSpeed counts one process), so the TEST-ONLY patches of
tests/distributed/harness.py are applied before the example's ``main`` builds its Trainer.
"""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.distributed.harness import allow_deepspeed_on_cpu, allow_fsdp_on_cpu, finish  # noqa: E402

if __name__ == "__main__":
    {"fsdp": allow_fsdp_on_cpu, "deepspeed": allow_deepspeed_on_cpu}[sys.argv[1]]()
    spec = importlib.util.spec_from_file_location("sft_lora_llm", ROOT / "examples" / "sft_lora_llm.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(sys.argv[2:])
    finish()
