"""Embedding images with a trained model: the Embedder, and how batches meet the model."""
