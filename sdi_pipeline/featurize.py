"""Compatibility path: the featurizer lives in :mod:`sdi_pipeline.engine.featurizer`."""

from sdi_pipeline.engine.featurizer import LossFn, StepFeatures, StepFeaturizer

__all__ = ["LossFn", "StepFeatures", "StepFeaturizer"]
