"""Prompt datasets, tokenization with chat templates, and the toy tasks of the CPU recipes."""
