"""The step-resolved gradient engine: per-example, per-loop-step features of a model.

- :mod:`.spec` the sketch specification; :mod:`.hashing` CountSketch hashes from (seed,
  parameter name); :mod:`.kernels` CountSketch / TensorSketch kernels.
- :mod:`.targets` which modules and parameters are analysed; :mod:`.registry` the layer
  handler base class and the per-type registry; :mod:`.layers` one file per layer type.
- :mod:`.capture` forward/gradient hooks routing each call to its slot; :mod:`.slots` the
  slot layout (prelude, loop steps, readout) inferred from the calls.
- :mod:`.featurizer` :class:`~.featurizer.StepFeaturizer`, which ties these together.

Importing this package imports nothing heavy; import the modules you need.
"""
