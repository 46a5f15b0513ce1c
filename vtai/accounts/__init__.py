"""Accounts people make and keep themselves: sign-up, password change and reset by email."""
