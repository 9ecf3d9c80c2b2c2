"""Data: synthetic volumes, ingest to OME-Zarr, catalogs, patch streaming, intensity normalisation."""
