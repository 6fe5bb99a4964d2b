"""The tiny embedded target: a small Qwen3 chat model trained on the Python standard library."""
