"""elemta: an SMTP daemon that knows its memory ceiling."""

__version__ = "0.1.0"
