"""Web side: FastAPI REST API, Jinja2 pages and the one-command launcher."""

__version__ = "0.1.0"
