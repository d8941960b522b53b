"""The Dagster resource of the alert channels: their settings, turned into `Channels`."""

import dagster as dg

from energy_pipeline.alerts.channels import (
    HTTP_TIMEOUT_S,
    Channels,
    EmailChannel,
    SlackChannel,
    WebhookChannel,
)


class AlertChannelsResource(dg.ConfigurableResource):
    """Where alert notifications go: webhook, Slack, SMTP email, and the log (always)."""

    webhook_url: str | None = None
    webhook_secret: str | None = None
    slack_webhook_url: str | None = None
    smtp_host: str | None = None
    smtp_port: int = 587
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_from: str | None = None
    smtp_to: list[str] = []
    smtp_starttls: bool = True
    http_timeout_s: float = HTTP_TIMEOUT_S

    def channels(self) -> Channels:
        """The channels configured here; the others stay None."""
        webhook = slack = email = None
        if self.webhook_url and self.webhook_secret:
            webhook = WebhookChannel(self.webhook_url, self.webhook_secret, self.http_timeout_s)
        if self.slack_webhook_url:
            slack = SlackChannel(self.slack_webhook_url, self.http_timeout_s)
        if self.smtp_host and self.smtp_from and self.smtp_to:
            email = EmailChannel(
                host=self.smtp_host,
                port=self.smtp_port,
                sender=self.smtp_from,
                recipients=tuple(self.smtp_to),
                username=self.smtp_username,
                password=self.smtp_password,
                starttls=self.smtp_starttls,
            )
        return Channels(webhook=webhook, slack=slack, email=email)
