"""Losses, one small module per loss family."""
