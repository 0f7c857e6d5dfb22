"""Example looped architectures and their training, for the ready-made configs."""
