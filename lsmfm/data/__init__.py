"""Data: synthetic volumes, readers, ingest to OME-Zarr, catalog, patch streaming."""
