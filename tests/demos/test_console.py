"""demos/console.py: quiet_sweep_logs keeps the sweep's and EMA's evaluation logs off the console (they still
reach the log history) and prints every other log as the Trainer's own printer does."""

import pytest
import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from robustft.demos.console import format_table, quiet_sweep_logs

LOGS = [{"loss": 1.5}, {"wise_ft_a0.5_id_accuracy": 0.7}, {"ema_eval_loss": 0.3}, {"eval_loss": 0.9}]


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return {"loss": (self.w * x).sum()}


def _trainer(tmp_path, disable_tqdm: bool) -> Trainer:
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, disable_tqdm=disable_tqdm)
    return Trainer(model=Tiny(), args=args)


def _printed(trainer, capsys) -> str:
    capsys.readouterr()
    for logs in LOGS:
        trainer.callback_handler.on_log(trainer.args, trainer.state, trainer.control, dict(logs))
    return capsys.readouterr().out


@pytest.mark.parametrize("disable_tqdm, printer", [(True, PrinterCallback), (False, ProgressCallback)])
def test_sweep_logs_are_not_printed_and_other_logs_print_as_before(tmp_path, capsys, disable_tqdm, printer):
    plain = _trainer(tmp_path / "plain", disable_tqdm)
    trainer = _trainer(tmp_path / "quiet", disable_tqdm)
    trainer.state.is_local_process_zero = plain.state.is_local_process_zero = True
    quiet_sweep_logs(trainer)
    mine = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, printer)]
    assert len(mine) == 1 and type(mine[0]) is not printer  # the printer was replaced, not doubled
    if printer is ProgressCallback:  # its on_log prints through the training bar: give both one
        for t in (plain, trainer):
            t.callback_handler.on_train_begin(t.args, t.state, t.control)
    shown, everything = _printed(trainer, capsys), _printed(plain, capsys)
    assert "wise_ft_a0.5" in everything and "ema_eval_loss" in everything
    assert "wise_ft_a0.5" not in shown and "ema_eval_loss" not in shown
    kept = [line for line in everything.splitlines() if "wise_ft" not in line and "ema_" not in line]
    assert shown.splitlines() == kept and "1.5" in shown and "0.9" in shown


def test_markdown_table_aligns_columns():
    table = format_table(["model", "loss"], [["base", "1.5"], ["plain LoRA", "0.25"]])
    lines = table.splitlines()
    assert lines[0] == "| model      | loss |"
    assert lines[1] == "|------------|------|"
    assert lines[3] == "| plain LoRA | 0.25 |"


QUIET_PROBE = """
import logging
from robustft.demos.console import demo_console
logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
with demo_console(verbose=False):
    import bitsandbytes  # noqa: F401  (its CPU backend may warn that the kernels-community kernel failed)
    logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: quiet probe")
with demo_console(verbose=True):
    logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: verbose probe")
"""


@pytest.mark.slow  # a fresh interpreter (the warning comes once, at import): about 5 s, more under load
def test_quiet_console_hides_the_bitsandbytes_kernel_warning_and_verbose_keeps_it():
    """bitsandbytes' CPU backend warns on import (the first ``from transformers import Trainer`` or ``import
    peft`` inside a demo) that the kernels-community gemm_4bit_forward did not load: a fresh interpreter
    shows no such line inside the quiet console, and shows it with --verbose (the console then changes
    nothing)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("bitsandbytes")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", QUIET_PROBE], cwd=root, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = [line for line in proc.stderr.splitlines() if "gemm_4bit_forward" in line]
    assert shown == ["Failed to load CPU gemm_4bit_forward from kernels-community: verbose probe"]
