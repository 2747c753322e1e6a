"""remat: rematerialization (activation checkpointing) planning for PyTorch training."""
