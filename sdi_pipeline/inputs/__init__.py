"""What a user brings: datasets and collate, per-example losses, checkpoints and their eta,
the loop-trace hook, digests of examples, and building all of these from a config."""
