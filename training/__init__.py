"""Headless training for the checkpoints the nodes run (``python -m training``).

It reuses ``model_patches`` so that training and sampling share one
implementation. Subcommands are listed by ``python -m training --help``.
"""
