"""The network: backbone and offline weights, pooling and heads, losses, fusion, precision,
and the one way a model is rebuilt from (config, state dict)."""
