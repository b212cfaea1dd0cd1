"""Experiment configs: each file's `get_config()` starts from `jaxdiff.config.default_config()`."""
