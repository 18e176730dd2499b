"""Energy-Based Transformers (Gladstone et al., 2025): models, training, thinking, evaluation."""

__version__ = "0.1.0"
