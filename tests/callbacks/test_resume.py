"""Callbacks resume from the folder the Trainer resumed from, wherever it lies and whatever output_dir is."""

from __future__ import annotations

import shutil

import pytest
import torch

from robustft import EMACallback, WiseFTCallback
from tests.callbacks.settings import train
from tests.tiny import stop_at, tiny_bert


def _train(out, callbacks, resume=None, **args):
    return train(tiny_bert(), out, callbacks, resume=resume, **args)


def _ema():
    return EMACallback(decay=0.7, save_dir=None)


def _wise():
    return WiseFTCallback(alpha=0.5)


def _result(cb, trainer):
    if isinstance(cb, EMACallback):
        return dict(zip(cb.average().names, cb.average().tensors))
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("make", [_ema, _wise], ids=["ema", "wise_ft"])
@pytest.mark.parametrize("where", ["moved_stale_output_dir", "moved_new_output_dir", "last_in_output_dir"])
def test_resumed_equals_uninterrupted(tmp_path, make, where):
    full = make()
    want = _result(full, _train(tmp_path / "full", [full]))
    _train(tmp_path / "part", [make(), stop_at(4)], save_strategy="steps", save_steps=4)
    if where == "last_in_output_dir":  # resume_from_checkpoint=True: the last checkpoint of output_dir
        out, resume = tmp_path / "part", True
    else:  # the checkpoint copied elsewhere, its run folder gone; output_dir is another folder
        resume = tmp_path / "moved" / "ckpt"
        shutil.copytree(tmp_path / "part" / "checkpoint-4", resume)
        shutil.rmtree(tmp_path / "part")
        out = tmp_path / "other"
        if where == "moved_stale_output_dir":  # holding a checkpoint-4 of another run, which must not be read
            _train(out, [make(), stop_at(4)], save_strategy="steps", save_steps=4, learning_rate=1e-2)
        resume = str(resume)
    resumed = make()
    got = _result(resumed, _train(out, [resumed], resume=resume, save_strategy="no"))
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)
