"""Drivers: small classes that act on one node's hardware (power, boot profile, console)."""
