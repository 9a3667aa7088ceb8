"""Thin adapters to ``transformers.TrainerCallback``: when to act, what to log, what to checkpoint."""
