"""Keeping less: content retention, a user's data export and deletion, and backups
(docs/operations.md)."""
