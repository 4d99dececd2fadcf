from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "notifications"
    verbose_name = "Sending"

    def ready(self) -> None:
        # Signal receivers, imported once the models are loaded: heartbeats (Celery), bounce
        # and complaint tracking (anymail), reminders cancelled by an answer (controls).
        from notifications import controls, heartbeats, webhooks  # noqa: F401
