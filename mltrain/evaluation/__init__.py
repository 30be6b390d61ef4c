"""Judging embeddings: pure metrics, verification, PCA and index sweeps, the evaluate flow,
figures, the markdown report and TensorBoard."""
