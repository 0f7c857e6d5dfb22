"""Compatibility path: the sketch spec lives in :mod:`sdi_pipeline.engine.spec`."""

from sdi_pipeline.engine.spec import KernelChoice, SketchSpec

__all__ = ["KernelChoice", "SketchSpec"]
