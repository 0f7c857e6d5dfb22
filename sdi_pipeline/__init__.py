"""sdi-pipeline: Step-Decomposed Influence for looped transformers."""
