"""tinylm: train sub-billion decoder-only language models on MLX and PyTorch from one recipe."""

__version__ = "0.1.0"
