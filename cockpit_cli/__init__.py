"""cockpit: train a benchmark problem with instruments attached, watch it live, diagnose it."""

__version__ = "0.1.0"
