"""Compatibility path: the sketch engine lives in :mod:`sdi_pipeline.engine`."""
