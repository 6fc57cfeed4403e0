"""cachefs: a distributed read cache for deep-learning training data."""

__version__ = "0.1.0"
