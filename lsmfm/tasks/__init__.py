"""Downstream tasks: few-shot segment/classify/deblur, metrics, whole-volume prediction."""
