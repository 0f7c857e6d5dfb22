"""sdi-pipeline: Step-Decomposed Influence for looped transformers.

The public API, imported on first use so that ``import sdi_pipeline`` (and opening results
with :class:`Results`) does not load torch or Hydra:

- :func:`attribute`: SDI / TracIn in one process; :class:`CheckpointSpec` a checkpoint and eta;
- :func:`attribute_bif`: BIF (SGLD loss-trace correlations) in one process; :class:`SGLDConfig`;
- :class:`StepFeaturizer` per-example per-step gradient features; :class:`SketchSpec` the sketch;
- :class:`Results`: a merged run's results.h5.

The package's folders are the stages of the data flow (README, "Architecture"); module
paths of earlier releases still import, through :mod:`sdi_pipeline.moved`.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from sdi_pipeline import moved

if TYPE_CHECKING:
    from sdi_pipeline.attribute import Attribution, attribute
    from sdi_pipeline.attribute_bif import BifAttribution, attribute_bif
    from sdi_pipeline.engine.featurizer import StepFeatures, StepFeaturizer
    from sdi_pipeline.engine.sgld import SGLDConfig
    from sdi_pipeline.engine.spec import SketchSpec
    from sdi_pipeline.errors import SDIError
    from sdi_pipeline.formats.results import Results
    from sdi_pipeline.inputs.checkpoints import CheckpointSpec

moved.install()

_EXPORTS = {
    "attribute": "sdi_pipeline.attribute",
    "Attribution": "sdi_pipeline.attribute",
    "attribute_bif": "sdi_pipeline.attribute_bif",
    "BifAttribution": "sdi_pipeline.attribute_bif",
    "SGLDConfig": "sdi_pipeline.engine.sgld",
    "CheckpointSpec": "sdi_pipeline.inputs.checkpoints",
    "StepFeaturizer": "sdi_pipeline.engine.featurizer",
    "StepFeatures": "sdi_pipeline.engine.featurizer",
    "SketchSpec": "sdi_pipeline.engine.spec",
    "Results": "sdi_pipeline.formats.results",
    "SDIError": "sdi_pipeline.errors",
}
__all__ = [
    "Attribution",
    "BifAttribution",
    "CheckpointSpec",
    "Results",
    "SDIError",
    "SGLDConfig",
    "SketchSpec",
    "StepFeatures",
    "StepFeaturizer",
    "attribute",
    "attribute_bif",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sdi_pipeline' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
