"""kasched: reinstall the nodes of your own batch job with the system you choose, and give them back clean."""

__version__ = "0.1.0"
