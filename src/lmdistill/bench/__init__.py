"""Benchmarks that ship with the package (``lmdistill bench``)."""
