"""Celery worker side: the Celery app, its tasks, and the training engine package."""
