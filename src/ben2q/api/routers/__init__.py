"""One router per resource: ``health``, ``jobs``, ``remove``."""
