"""oO ML Serving: pick the next tip to show a user, and learn from what they do with it."""

__version__ = "0.1.0"
