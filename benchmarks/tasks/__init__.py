"""VTAB-style structured tasks composed from real images; see structured.py."""
