"""Synthetic light-sheet data: tissue geometry (`scene`), image formation (`optics`), volumes with ground
truth (`volume`) and their files on disk (`write`)."""
