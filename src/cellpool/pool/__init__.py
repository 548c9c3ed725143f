"""Worker pools, one module per kind, behind the interface in ``base``."""
