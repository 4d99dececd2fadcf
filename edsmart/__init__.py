"""EdSmart: permission slips and broadcasts to parents, each delivered exactly once."""

from .celery import app as celery_app

__all__ = ("celery_app",)
