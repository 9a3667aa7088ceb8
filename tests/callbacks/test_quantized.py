"""The callbacks on a QLoRA model: a PEFT LoRA on a bitsandbytes 4-bit (NF4) or 8-bit tiny Llama, on CPU.

Reference: the same callback on the dequantized float copy of the same base (transformers' ``dequantize``,
so its weights are exactly the quantized ones), with the same LoRA initialisation. In training mode the
bitsandbytes layers compute ``x @ dequantize(W)ᵀ`` on CPU, so the adapters trained on both must agree to
rounding. Flat-LoRA and LoRA-MGPO, whose ε belongs on the frozen W0, add x·εᵀ to the quantized layer's output
instead.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer  # noqa: E402

from robustft import callbacks  # noqa: E402
from tests.callbacks.trl_helpers import WORDS, save_tiny_llama  # noqa: E402
from tests.tiny import training_args  # noqa: E402

BITS = (4, 8)
STEPS = 3


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """The tiny Llama, wide enough for bitsandbytes' 4-bit blocks (64), saved with its tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("llama64"), hidden_size=64)


def quantization_config(bits: int) -> BitsAndBytesConfig:
    """NF4 with a float32 compute dtype, or LLM.int8()."""
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=torch.float32)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_base(path: str, bits: int, dequantized: bool = False):
    """The base loaded in ``bits``; ``dequantized``: made float again (its weights equal the quantized)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization_config(bits),
                                                     device_map="cpu")
        if dequantized:
            model = model.dequantize(dtype=torch.float32)
    return model


def lora_config() -> peft.LoraConfig:
    return peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                           task_type="CAUSAL_LM")


def with_lora(model):
    torch.manual_seed(0)
    return peft.get_peft_model(model, lora_config())


def lm_data(n: int = 16, seq_len: int = 8) -> Dataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, len(WORDS), (n, seq_len), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def adapter(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


def train(model, out, callback) -> dict[str, torch.Tensor]:
    """``STEPS`` Trainer steps of ``model`` with ``callback``; the adapter it ends with."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=training_args(out, max_steps=STEPS, per_device_train_batch_size=4),
                train_dataset=lm_data(), callbacks=[callback]).train()
    return adapter(model)


def _fisher_of_ones(model) -> dict[str, torch.Tensor]:
    return {n: torch.ones_like(p) for n, p in model.named_parameters() if p.requires_grad}


def _random_scores(model) -> dict[str, torch.Tensor]:
    """Seeded random scores (magnitudes would keep only A, whose gradient is 0 while B = 0)."""
    g = torch.Generator().manual_seed(0)
    return {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters() if p.requires_grad}


#: every callback that acts on LoRA weights, built for a tiny run (``model``: the PEFT model, for setups)
ON_ADAPTER = {
    "EMA": lambda m: callbacks.EMACallback(decay=0.7),
    "SWA": lambda m: callbacks.SWACallback(start=1),
    "LAWA": lambda m: callbacks.LAWACallback(k=2, update_every=1),
    "WiSE-FT": lambda m: callbacks.WiseFTCallback(alpha=0.5),
    "SAM": lambda m: callbacks.SAMCallback(rho=0.05),
    "ASAM": lambda m: callbacks.SAMCallback(rho=0.5, adaptive=True),
    "Momentum-SAM": lambda m: callbacks.MomentumSAMCallback(rho=0.05),
    "RWP-adapter": lambda m: callbacks.RandomPerturbationCallback(rho=0.05, seed=3, lora=False),
    "L2-SP": lambda m: callbacks.L2SPCallback(0.5),
    "MGPO": lambda m: callbacks.MGPOCallback(rho=0.05),  # step 1 has no momentum: steps 2 and 3 perturb
    "EWC": lambda m: callbacks.EWCCallback(0.5, fisher=_fisher_of_ones(m)),
    "Spectral": lambda m: callbacks.SpectralRegCallback(0.5),
    "Sparse": lambda m: callbacks.SparseUpdateCallback(density=0.25, scores=_random_scores(m)),
    "LoRAArithmetic": lambda m: callbacks.LoRAArithmeticCallback({"self": 0.5}),
}


#: one callback per family runs in the fast subset; the rest are marked slow (two tiny trainings each)
FAST = {("EMA", 4), ("WiSE-FT", 4), ("Momentum-SAM", 4), ("L2-SP", 4), ("MGPO", 4), ("MGPO", 8)}
#: (rtol, atol): 4-bit trains through exactly x @ dequantize(W)ᵀ on CPU; 8-bit's CPU matmul differs from the
#: float product by ~1e-7 relative, which SAM's ascent step amplifies a little
TOLERANCE = {4: (1e-4, 1e-6), 8: (1e-3, 1e-5)}


def _cases() -> list:
    return [pytest.param(name, bits, id=f"{name}-{bits}bit",
                         marks=() if (name, bits) in FAST else pytest.mark.slow)
            for name in sorted(ON_ADAPTER) for bits in BITS]


@pytest.mark.parametrize(("name", "bits"), _cases())
def test_callback_on_a_quantized_base_equals_the_dequantized_float_base(llama_dir, tmp_path, name, bits):
    quantized = with_lora(load_base(llama_dir, bits))
    reference = with_lora(load_base(llama_dir, bits, dequantized=True))
    start = adapter(quantized)
    assert start and all(torch.equal(start[n], t) for n, t in adapter(reference).items())
    got = train(quantized, tmp_path / "q", ON_ADAPTER[name](quantized))
    want = train(reference, tmp_path / "f", ON_ADAPTER[name](reference))
    assert any(not torch.equal(got[n], start[n]) for n in got)  # it trained
    for n in want:
        rtol, atol = TOLERANCE[bits]
        torch.testing.assert_close(got[n], want[n], rtol=rtol, atol=atol,
                                   msg=lambda m, n=n: f"{name}, {bits}-bit, {n}: {m}")


@pytest.mark.parametrize("bits", [4, pytest.param(8, marks=pytest.mark.slow)])
def test_flat_lora_on_a_quantized_base_equals_it_on_the_dequantized_float_base(llama_dir, tmp_path, bits):
    """Flat-LoRA perturbs W0 + s·B·A; a quantized W0 takes the noise through its layer's output (x·εᵀ),
    the float copy in place (W0 + ε): the same seeds, row norms and gradients, so the same adapter."""
    from robustft.core.params import quantization

    quantized = with_lora(load_base(llama_dir, bits))
    reference = with_lora(load_base(llama_dir, bits, dequantized=True))
    stored = {n: p.detach().clone() for n, p in quantized.named_parameters() if quantization(p) is not None}
    got = train(quantized, tmp_path / "q", callbacks.RandomPerturbationCallback(rho=0.3, seed=3, lora=True))
    want = train(reference, tmp_path / "f", callbacks.RandomPerturbationCallback(rho=0.3, seed=3, lora=True))
    params = dict(quantized.named_parameters())
    assert stored and all(torch.equal(params[n], t) for n, t in stored.items())  # W0 itself is never written
    plain = train(with_lora(load_base(llama_dir, bits)), tmp_path / "p", callbacks.EMACallback(decay=0.5))
    rtol, atol = TOLERANCE[bits]
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=rtol, atol=atol, msg=lambda m, n=n: f"{n}: {m}")
    assert any((got[n] - plain[n]).abs().max() > 100 * atol for n in got)  # the noise changed the gradients
    assert not any("forward" in vars(m) for m in quantized.modules())  # no wrapper left on the model


@pytest.mark.slow
def test_ema_reference_with_trl_dpo_on_an_nf4_base_equals_the_dequantized_base(llama_dir, tmp_path):
    trl = pytest.importorskip("trl")
    from transformers import AutoTokenizer

    from tests.callbacks.trl_helpers import preference_data

    def run(model, out):
        args = trl.DPOConfig(output_dir=str(out), per_device_train_batch_size=4, max_steps=STEPS,
                             learning_rate=5e-2, lr_scheduler_type="constant", logging_steps=1,
                             save_strategy="no", report_to=[], seed=0, use_cpu=True, bf16=False, beta=0.5,
                             disable_tqdm=True,
                             gradient_checkpointing=False)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = trl.DPOTrainer(model=model, args=args, train_dataset=preference_data(),
                                     processing_class=AutoTokenizer.from_pretrained(llama_dir),
                                     callbacks=[callbacks.EMAReferenceCallback(0.6)],
                                     peft_config=lora_config())
            trainer.train()
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".lora_" in n}

    got = run(load_base(llama_dir, 4), tmp_path / "q")
    want = run(load_base(llama_dir, 4, dequantized=True), tmp_path / "f")
    refs = [n for n in got if ".ref." in n]
    assert refs and set(got) == set(want)
    assert any(not torch.equal(got[n], got[n.replace(".ref.", ".default.")]) for n in refs)  # an EMA
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def _needs_the_cpu_repack() -> None:
    """bitsandbytes repacks 4-bit CPU weights for inference only on CPUs with AVX512-BF16."""
    from bitsandbytes.functional import has_avx512bf16

    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never repacks its 4-bit weights here")


def test_evaluations_during_training_on_an_nf4_base_leave_training_as_without_them(llama_dir, tmp_path):
    """An evaluation after every step (eval mode, no gradients) would make bitsandbytes 0.50.2 repack the
    4-bit weights for CPU inference, after which their backward no longer reaches the layers' inputs: with a
    robustft callback the run ends where the same run without evaluations ends."""
    _needs_the_cpu_repack()

    def run(out, **evaluate):
        model = with_lora(load_base(llama_dir, 4))
        args = training_args(out, max_steps=STEPS, per_device_train_batch_size=4, **evaluate)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Trainer(model=model, args=args, train_dataset=lm_data(), eval_dataset=lm_data(8),
                    callbacks=[callbacks.EMACallback(decay=0.5)]).train()
        return model, adapter(model)

    evaluated, got = run(tmp_path / "eval", eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4)
    _, want = run(tmp_path / "plain")
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    layers = [m for m in evaluated.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)  # switched off, as the demo does


def test_a_callback_refuses_an_nf4_base_already_repacked_for_cpu_inference(llama_dir, tmp_path):
    """Scored in eval mode without gradients before training, the 4-bit layers are in bitsandbytes' CPU
    inference layout: training would be silently wrong, so a robustft callback refuses it at train begin,
    naming a layer, before any step."""
    _needs_the_cpu_repack()
    model = with_lora(load_base(llama_dir, 4)).eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([lm_data(1)[0]["input_ids"]]))
    args = training_args(tmp_path, max_steps=STEPS, per_device_train_batch_size=4)
    trainer = Trainer(model=model, args=args, train_dataset=lm_data(),
                      callbacks=[callbacks.EMACallback(decay=0.5)])
    with pytest.raises(ValueError, match=r"q_proj.*CPU inference layout.*support_avx512bf16_for_cpu = False"):
        trainer.train()
    assert trainer.state.global_step == 0
