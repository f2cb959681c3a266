"""Tiny random LVLMs of every declared family, built from configs in code (no downloads).

One module per family group (`tests/tiny/<name>.py`), each with a `BUILDERS` dict of
name -> builder; `tests.tiny_models` gathers them, so adding a module adds its models to every
contract test.
"""
