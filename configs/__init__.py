"""Experiment configurations (``get_config(arg)`` modules for ml_collections config_flags)."""
