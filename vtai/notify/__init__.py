"""Telling people: quota notices in the chat, and signed webhooks to the operator
(docs/operations.md)."""
