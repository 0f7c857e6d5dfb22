"""The run-directory contract: the config (schema, validation, hash), paths, units and
blocks, provenance, leases, and whether what is on disk is still fresh."""
