"""What every family builds on: parameter selection and snapshots, collectives, private third-party state,
atomic files, a model as a function of its weights, and statistics of a model on data (Fisher, Gram).

Nothing is imported here: ``from robustft.core import params`` loads only that module.
"""
