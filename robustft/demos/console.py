"""Console helpers shared by the demos: one line per stage, the Trainer's own output only with --verbose."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

__all__ = ["Stages", "demo_console", "format_table", "quiet_sweep_logs", "trainer_console"]

# what a demo hides unless --verbose: deprecation notices of the libraries it drives
HIDDEN_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
# loggers outside transformers' verbosity, quieted to errors: DeepSpeed's accelerator notice (its own stdout
# handler), and bitsandbytes' CPU backend, which warns on import (transformers' Trainer or peft imports it)
# that the kernels-community gemm_4bit_forward kernel did not load (it falls back to its own CPU kernel).
# A filter acts on the logger that creates the record only, so each is named in full.
QUIET_LOGGERS = ("DeepSpeed", "bitsandbytes.backends.cpu.ops")


def _errors_only(record: logging.LogRecord) -> bool:
    """A logging filter passing errors and worse only."""
    return record.levelno >= logging.ERROR


@contextmanager
def demo_console(verbose: bool) -> Iterator[None]:
    """While a demo runs: unless ``verbose``, transformers, DeepSpeed and bitsandbytes' CPU backend log errors
    only, neither transformers (weight loading) nor datasets shows progress bars and deprecation warnings are
    ignored; everything is restored on exit (no global filter is left)."""
    if verbose:
        yield
        return
    from datasets.utils import logging as datasets_logging
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled(), datasets_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets_logging.disable_progress_bar()
    quiet = [logging.getLogger(name) for name in QUIET_LOGGERS]
    for logger in quiet:
        logger.addFilter(_errors_only)
    try:
        with warnings.catch_warnings():
            for category in HIDDEN_WARNINGS:
                warnings.simplefilter("ignore", category)
            yield
    finally:
        hf_logging.set_verbosity(level)
        for logger in quiet:
            logger.removeFilter(_errors_only)
        if bars[0]:
            hf_logging.enable_progress_bar()
        if bars[1]:
            datasets_logging.enable_progress_bar()


class Stages:
    """Numbered stage lines, ``[i/n] label ... result (s)``: one line each unless ``verbose``, where the
    Trainer's logs come between the label and the result."""

    def __init__(self, total: int, verbose: bool = False, print_fn=print):
        self.total, self.verbose, self.print = total, verbose, print_fn
        self.done, self.t0 = 0, 0.0

    def start(self, label: str) -> None:
        """Open the next stage's line."""
        self.done += 1
        self.t0 = time.perf_counter()
        self.print(f"[{self.done}/{self.total}] {label} ...", end="\n" if self.verbose else " ", flush=True)

    def end(self, result: str = "done") -> None:
        """Close the stage's line with ``result`` and its wall time."""
        self.print(f"{result} ({time.perf_counter() - self.t0:.0f} s)", flush=True)


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


def trainer_console(trainer, verbose: bool, prefixes: tuple[str, ...] = ("wise_ft_a", "ema_")) -> None:
    """The Trainer's printing for a demo: with ``verbose`` its log dicts (less the sweep's), else none
    (``PrinterCallback`` and ``ProgressCallback`` removed; ``state.log_history`` is kept either way)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if verbose:
        quiet_sweep_logs(trainer, prefixes)
        return
    for cb in list(trainer.callback_handler.callbacks):
        if isinstance(cb, (PrinterCallback, ProgressCallback)):
            trainer.remove_callback(cb)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (readable as plain text): the demos print it, the benchmarks paste it into docs."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
