"""Blob stores (the BlobStore port and its adapters) and the tier accessor above them."""
