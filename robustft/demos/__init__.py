"""``robustft demo``: the encoder and LLM demos, the zero-shot classifier they start from, console helpers.

Nothing is imported here: the CLI parser (``demos/cli.py``) is built without torch.
"""
