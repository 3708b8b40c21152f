"""Reading and writing: audio, strict configs, atomic files, checkpoints, package data, logs."""
