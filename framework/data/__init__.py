"""Shards: the format, reading (split, shuffle, decode, resume), writing, sources, precomputation."""
