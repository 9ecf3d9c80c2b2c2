"""Reading and writing: volumes, OME-Zarr stores, atomic file writes."""
