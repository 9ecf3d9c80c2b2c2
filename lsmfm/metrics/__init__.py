"""Metrics, one module per family: segmentation overlap, instance accuracy, restoration, classification."""
