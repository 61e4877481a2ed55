"""Thin adapters between Lightning and the engine: the CheckpointIO plugin and the callbacks."""
