"""Reverse image search: Faiss indexes, embedding shards, search bundles, and searching,
enrolling and verifying with them (the commands over these are in `mltrain.commands`)."""
