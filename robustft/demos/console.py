"""Console helpers shared by the demos: what reaches the terminal while the Trainer logs."""

from __future__ import annotations

__all__ = ["quiet_sweep_logs"]


def quiet_sweep_logs(trainer, prefixes: tuple[str, ...] = ("wise_ft_a", "ema_")) -> None:
    """Keep the console to training logs and the final table: evaluation logs whose keys start with
    ``prefixes`` (the per-(α, split) sweep, the EMA scores) still reach ``state.log_history`` and the
    curve files, they are just not printed."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for base in (ProgressCallback, PrinterCallback):
        old = next((cb for cb in trainer.callback_handler.callbacks if type(cb) is base), None)
        if old is None:
            continue

        class Quiet(base):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and any(k.startswith(prefixes) for k in logs):
                    return
                return super().on_log(args, state, control, logs=logs, **kwargs)

        trainer.remove_callback(old)
        trainer.add_callback(Quiet())
