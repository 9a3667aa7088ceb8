"""examples/sft_lora_llm.py (LoRA in TRL's SFTTrainer + EMA + Flat-LoRA + WiSE-FT) and examples/accelerate/.

The in-process run records the adapter after every optimizer step; every claim of the example is then
checked against a reference computed here from those records: the dense WiSE-FT formula merged by PEFT,
the argmin of the saved curve, a brute-force EMA, and the untouched base weights. The 2-process runs go
through ``accelerate launch`` with each config of examples/accelerate/ (gloo on CPU; FSDP2 and
DeepSpeed through the TEST-ONLY CPU patches) and must reproduce the DDP launch. The YAML configs are
also fed through accelerate's own launch validation into its FSDP/DeepSpeed plugins.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from tests.distributed.harness import free_port, require_slow_marker

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "sft_lora_llm.py"
CONFIGS = ROOT / "examples" / "accelerate"
WRAPPER = ROOT / "tests" / "distributed" / "example_run.py"  # the example with TEST-ONLY CPU patches

pytest.importorskip("trl", reason="the LLM example needs trl (pip install -e '.[llm]')")


def load_example():
    spec = importlib.util.spec_from_file_location("sft_lora_llm_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class AdapterRecorder(TrainerCallback):
    """The trainable (LoRA) tensors after every optimizer step, and the step's logged perturbation."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    recorder = AdapterRecorder()
    alphas = [0.0, 0.3, 0.6, 0.9]  # 1.0 left out, so the chosen model is a real interpolation
    result = load_example().main(
        ["--output-dir", str(out), "--steps", "30", "--ema-decay", "0.85", "--alphas", *map(str, alphas)],
        extra_callbacks=[recorder],
    )
    return out, result, recorder


def lora_pairs(names):
    """(A name, B name) of every LoRA layer, by the PEFT naming ``...lora_A.default.weight``."""
    return [(n, n.replace("lora_A", "lora_B")) for n in names if ".lora_A." in n]


@pytest.mark.slow
def test_sft_trainer_really_trained_a_lora_adapter(run):
    out, result, rec = run
    trainer = result["trainer"]
    assert len(rec.steps) == trainer.state.max_steps == 30
    names = list(rec.steps[-1])
    assert names and all("lora_" in n for n in names)  # only the adapter is trained
    for _, b in lora_pairs(names):
        assert rec.steps[-1][b].abs().max() > 0, b  # B starts at 0 and moved
    first, last = result["train_loss_first_last"]
    assert last < first - 0.1
    assert json.loads((out / "summary.json").read_text())["world_size"] == 1


@pytest.mark.slow
def test_wise_ft_left_the_dense_interpolation_chosen_on_id_loss(run):
    out, result, rec = run
    curve = json.loads((out / "wise_ft.json").read_text())
    ids = curve["results"]["id"]
    alpha = curve["chosen_alpha"]
    assert alpha == curve["alphas"][min(range(len(ids)), key=ids.__getitem__)]  # argmin of ID loss
    assert alpha == result["chosen_alpha"] and alpha not in (0.0, 1.0)
    assert set(curve["results"]) == {"id", "shifted"}

    model = result["trainer"].model
    scale = model.peft_config["default"].lora_alpha / model.peft_config["default"].r
    end = rec.steps[-1]
    w0 = load_file(str(out / "tiny" / "model" / "model.safetensors"))
    merged = copy.deepcopy(model).merge_and_unload().state_dict()  # PEFT merges the live adapter
    checked = 0
    for a, b in lora_pairs(end):
        key = a.split("base_model.model.", 1)[1].replace(".lora_A.default", "")
        dense = w0[key] + alpha * scale * end[b] @ end[a]  # W0 + α*·s·B_end A_end
        torch.testing.assert_close(merged[key], dense, atol=1e-6, rtol=1e-5)
        checked += 1
    assert checked == 14  # 7 linear modules x 2 layers (all-linear)

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(out / "tiny" / "model")
    saved = PeftModel.from_pretrained(base, out / "adapter")
    params = dict(saved.named_parameters())
    for a, b in lora_pairs(end):
        torch.testing.assert_close(params[b], alpha * end[b], atol=1e-7, rtol=1e-6)
        assert torch.equal(params[a], end[a])


@pytest.mark.slow
def test_ema_adapter_loads_with_peft_and_equals_brute_force_ema(run):
    out, _, rec = run
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ema = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "tiny" / "model"), out / "ema")
    params = dict(ema.named_parameters())
    beta = 0.85
    brute = {n: t.clone() for n, t in rec.steps[0].items()}  # the first update copies
    for k, step in enumerate(rec.steps[1:], start=1):
        decay = min(beta, 1 - (1 + k) ** (-2 / 3))  # timm's warmup, k = updates so far
        for n in brute:
            brute[n] = decay * brute[n] + (1 - decay) * step[n]
    assert math.isclose(decay, beta)  # the warmup reached β: both regimes checked
    for n, t in brute.items():
        torch.testing.assert_close(params[n], t, atol=1e-6, rtol=1e-5)
        assert not torch.equal(params[n], rec.steps[-1][n])  # an average, not the last weights


@pytest.mark.slow
def test_flat_lora_logged_a_perturbation_and_left_none_behind(run):
    out, result, _ = run
    trainer = result["trainer"]
    norms = [h["rwp/perturbation_norm"] for h in trainer.state.log_history if "rwp/perturbation_norm" in h]
    assert norms and all(n > 0 for n in norms)
    w0 = load_file(str(out / "tiny" / "model" / "model.safetensors"))
    base = trainer.model.get_base_model().state_dict()
    perturbed_targets = 0
    for key, ref in w0.items():  # the perturbed (frozen) base weights are bit-exactly the saved ones
        live = base.get(key, base.get(key.replace(".weight", ".base_layer.weight")))
        assert torch.equal(live, ref), key
        perturbed_targets += key.replace(".weight", ".base_layer.weight") in base
    assert perturbed_targets == 14


def launch_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


CONFIG_RUNS = {  # config -> (TEST-ONLY CPU patch applied by tests/distributed/example_run.py, mode that runs)
    "ddp.yaml": (None, "MULTI_CPU"),  # DDP over gloo: the reference
    "fsdp2.yaml": ("fsdp", "FSDP"),
    "deepspeed_zero2.yaml": ("deepspeed", "DEEPSPEED"),
    "deepspeed_zero3.yaml": ("deepspeed", "DEEPSPEED"),
}


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """``accelerate launch --config_file examples/accelerate/<config>`` of the example on 2 CPU ranks, once
    per config: (stdout, output folder). Momentum-SAM (element-wise, no random draw) as the one-pass
    perturbation, so every mode must reproduce the DDP run."""
    done = {}

    def launch(config: str):
        if config not in done:
            require_slow_marker()
            out = tmp_path_factory.mktemp(config.split(".")[0])
            patch = CONFIG_RUNS[config][0]
            script = [str(EXAMPLE)] if patch is None else [str(WRAPPER), patch]
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
                   "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
                   *script, "--output-dir", str(out), "--steps", "12", "--sam", "msam"]
            env = {**launch_env(), "DS_ACCELERATOR": "cpu"}
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
            done[config] = proc.stdout, out
        return done[config]

    return launch


@pytest.mark.slow
@pytest.mark.parametrize("config", list(CONFIG_RUNS))
def test_two_process_accelerate_launch_with_each_config_equals_ddp(launched, config):
    """Under every shipped config the example's outputs (the WiSE-FT curve, the chosen and the EMA adapter
    files) equal the DDP launch's: FSDP2 and ZeRO-3 write θ(α) and the EMA weights into shards and
    partitions, and the sweep scores what was written."""
    stdout, out = launched(config)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["distributed_type"] == CONFIG_RUNS[config][1]
    assert summary["sam"] == "msam" and summary["perturbation_norm_last"] > 0  # MSAM acted on every rank
    assert summary["chosen_alpha_per_rank"] == [summary["chosen_alpha"]] * 2  # both ranks chose the same α
    assert stdout.count("WiSE-FT chose alpha") == 1  # only the main process prints
    curve = json.loads((out / "wise_ft.json").read_text())["results"]
    assert curve["id"][-1] < curve["id"][0] - 0.1  # the sweep saw the trained adapter at α=1
    _, ref = launched("ddp.yaml")
    ref_curve = json.loads((ref / "wise_ft.json").read_text())["results"]
    for name in ("id", "shifted"):
        assert curve[name] == pytest.approx(ref_curve[name], abs=1e-5)
    for sub in ("adapter", "ema"):
        got = load_file(str(out / sub / "adapter_model.safetensors"))
        want = load_file(str(ref / sub / "adapter_model.safetensors"))
        assert got.keys() == want.keys() and want
        for key in want:
            scale = float(want[key].abs().max())
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-4 * scale + 1e-9, msg=key)
            if sub == "ema":
                assert scale > 0, key


# -- the accelerate configs -------------------------------------------------------------------------
def validated(name: str):
    """Parse ``accelerate launch --config_file <name>`` with accelerate's own parser and validation."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = CONFIGS / name
    config = load_config_from_file(str(path))  # unknown top-level keys raise here
    assert isinstance(config, ClusterConfig)
    parser = launch_command_parser()
    known = {a.dest for a in parser._actions}
    for section in (config.fsdp_config, config.deepspeed_config):
        unknown = set(section) - known  # launch would copy these onto its args and silently ignore them
        assert not unknown, f"{name}: keys accelerate launch does not know: {sorted(unknown)}"
    args, _, _ = _validate_launch_command(
        parser.parse_args(["--config_file", str(path), "--main_process_port", "29555", "train.py"])
    )
    assert config.mixed_precision == args.mixed_precision == "bf16" and not config.use_cpu
    assert config.num_processes == args.num_processes == 2
    return config, args


def test_ddp_config_is_multi_gpu():
    config, args = validated("ddp.yaml")
    assert config.distributed_type.value == "MULTI_GPU" and args.multi_gpu
    assert not (args.use_fsdp or args.use_deepspeed)


def test_fsdp2_config_reaches_accelerates_fsdp2_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from transformers.models.llama import modeling_llama

    config, args = validated("fsdp2.yaml")
    assert config.distributed_type.value == "FSDP" and args.use_fsdp
    env = prepare_multi_gpu_env(args)
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()  # reads the environment the launcher hands the workers
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # FSDP2 full shard
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert hasattr(modeling_llama, "LlamaDecoderLayer")  # the class named really exists


def deepspeed_plugin(name: str, monkeypatch):
    """The DeepSpeedPlugin a worker builds from the environment ``accelerate launch`` hands it for <name>."""
    from accelerate.utils import DeepSpeedPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    monkeypatch.chdir(ROOT)  # a yaml names its DeepSpeed json relative to the repository root
    config, args = validated(name)
    assert config.distributed_type.value == "DEEPSPEED" and args.use_deepspeed
    args.deepspeed_fields_from_accelerate_config = ",".join(config.deepspeed_config)
    _, env = prepare_deepspeed_cmd_env(args)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    return DeepSpeedPlugin()


def test_deepspeed_config_reaches_accelerates_deepspeed_plugin(monkeypatch):
    plugin = deepspeed_plugin("deepspeed_zero2.yaml", monkeypatch)
    assert plugin.zero_stage == 2 and plugin.deepspeed_config["zero_optimization"]["stage"] == 2
    assert plugin.deepspeed_config["zero_optimization"]["offload_optimizer"]["device"] == "none"


def test_deepspeed_zero3_config_reaches_accelerates_deepspeed_plugin(monkeypatch):
    """The ZeRO-3 yaml hands its json to accelerate; the json partitions every parameter (persistence
    threshold 0, which robustft needs). tests/distributed/deepspeed_run.py trains with this json."""
    plugin = deepspeed_plugin("deepspeed_zero3.yaml", monkeypatch)
    assert plugin.zero_stage == 3 and plugin.zero3_init_flag
    assert plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] == 0


@pytest.mark.slow  # two end-to-end SFTTrainer runs
def test_exact_sam_replay_is_not_counted_by_trl(tmp_path):
    """SAM replays each micro-batch through SFTTrainer.compute_loss; TRL's token count and per-batch metrics
    must still count every batch once: the logged num_tokens equals that of a run without SAM."""
    from robustft import SAMCallback

    example = load_example()
    argv = ["--tiny", "--steps", "3", "--sam", "none", "--alphas", "1.0", "--batch-size", "4"]
    plain = example.main([*argv, "--output-dir", str(tmp_path / "plain")])
    sam_cb = SAMCallback(rho=0.05)
    sam = example.main([*argv, "--output-dir", str(tmp_path / "sam")], extra_callbacks=[sam_cb])

    def tokens(run):
        return [e["num_tokens"] for e in run["trainer"].state.log_history if "num_tokens" in e]

    assert tokens(plain) and tokens(sam) == tokens(plain)
    assert any("sam/sharpness" in e for e in sam["trainer"].state.log_history)  # SAM really ran
