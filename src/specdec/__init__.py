"""specdec: train and evaluate draft models for speculative decoding, as PyTorch Lightning components."""

__version__ = "0.1.0"
