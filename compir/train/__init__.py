"""Training stage (torch + open_clip): models, composition heads, the loop, checkpoints."""
