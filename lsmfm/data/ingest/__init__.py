"""Ingest: any volume to a chunked OME-Zarr store (`convert`), its pyramid (`pyramid`) and the intensity
statistics gathered on the way (`stats`)."""
