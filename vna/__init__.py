"""vna: a high-availability vendor-neutral archive for medical images."""

__all__ = ["__version__"]
__version__ = "0.1.0"
