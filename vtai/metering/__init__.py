"""Metering: a turn gated, called and recorded (see docs/architecture.md)."""
