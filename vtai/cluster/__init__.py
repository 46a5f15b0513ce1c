"""Several app processes behind HAProxy on one database (docs/deploy.md)."""
