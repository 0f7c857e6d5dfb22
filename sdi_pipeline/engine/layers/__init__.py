"""Built-in layer handlers, one file per layer type; importing this registers them.

To support a new layer type, add a file here with a :class:`~sdi_pipeline.engine.registry.
LayerHandler` subclass decorated with ``@register_layer(MyModule)`` and import it below.
"""

from sdi_pipeline.engine.layers import conv1d, embedding, generic, linear, opacus

__all__ = ["conv1d", "embedding", "generic", "linear", "opacus"]
