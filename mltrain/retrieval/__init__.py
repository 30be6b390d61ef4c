"""Reverse image search: Faiss indexes, embedding shards, search bundles and the search
command."""
