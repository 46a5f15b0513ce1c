"""The HTTP edge: origins and headers, login sessions, uploads."""
