"""Tiny models and data shared by the retention, report and ``robustft report`` tests."""

import json

import torch

WORDS = ["</s>", "[UNK]", "[PAD]", "user", "assistant", ":", "What", "is", "the", "?", "It", "yes", "no",
         "Paris", "a", "cat", ".", "Say", "hello", "blue"]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")
PROMPTS = ["What is the cat ?", "Say hello", "What is blue ?", "What is Paris ?", "Say yes", "Say no .",
           "What is a cat ?", "Say blue"]
ROWS = [("What is the cat ?", "It is a cat ."), ("Say hello", "hello"), ("What is Paris ?", "It is Paris ."),
        ("Say yes", "yes yes no ."), ("What is blue ?", "blue")]
ID_ROWS = [{"messages": [{"role": "user", "content": "What is the cat ?"},
                         {"role": "assistant", "content": "It is a cat ."}]},
           {"prompt": [{"role": "user", "content": "Say hello"}],
            "completion": [{"role": "assistant", "content": "hello hello"}]},
           {"messages": [{"role": "user", "content": "What is Paris ?"},
                         {"role": "assistant", "content": "Paris is blue ."}]}]
SHIFT_ROWS = [{"messages": [{"role": "user", "content": "Say blue"}, {"role": "assistant", "content": "no"}]},
              {"messages": [{"role": "user", "content": "What is a cat ?"},
                            {"role": "assistant", "content": "a cat is yes"}]}]


def write_jsonl(path, rows):
    """``rows`` as a JSONL file at ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def save_adapter(base, folder):
    """A PEFT LoRA adapter on the model in ``base`` with B != 0 (as after training), saved in ``folder``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)  # B != 0, as after training
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(folder)
    return folder
