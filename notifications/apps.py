from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "notifications"
    verbose_name = "Sending"

    def ready(self) -> None:
        # Signal receivers: heartbeats (Celery) and bounce/complaint tracking (anymail).
        from notifications import heartbeats, webhooks  # noqa: F401
