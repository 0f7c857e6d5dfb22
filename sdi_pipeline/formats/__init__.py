"""One module per file format: train and query sketch files (``sketches``), score shards
(``shards``) and results.h5 (``results``, with the light :class:`Results` reader)."""
