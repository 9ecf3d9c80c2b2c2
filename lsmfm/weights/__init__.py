"""Pretrained weights: safetensors format, registry of releases, the paper checkpoints, export."""
