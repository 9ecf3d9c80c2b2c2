"""Finetuning tasks: the registry (`registry.py`) and one module per task (segment, classify, deblur), the
few-shot protocol, the training loop, task models and whole-volume prediction."""
