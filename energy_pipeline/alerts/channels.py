"""Notification channels: signed webhook, Slack incoming webhook, email over SMTP, and the log.

A channel sends one outbox row and says how it went: it returns when the receiver accepted the
notification, raises `PermanentError` when sending it again cannot help (the receiver refused it),
and `TransientError` when a later attempt may succeed (timeouts, connection errors, 5xx, 408/429).
`delivery.deliver_pending` turns those into delivered, retried and dead-lettered rows.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import smtplib
import ssl
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any, Protocol

import requests

LOGGER = logging.getLogger("energy_pipeline.alerts")
SIGNATURE_HEADER = "X-Energy-Signature"
TIMESTAMP_HEADER = "X-Energy-Timestamp"
IDEMPOTENCY_HEADER = "X-Energy-Idempotency-Key"
USER_AGENT = "energy-pipeline-alerts/1"
# Connect and read timeouts of one HTTP send: a slow receiver holds its outbox row (and nothing
# else) this long at most.
HTTP_TIMEOUT_S = 5.0
SMTP_TIMEOUT_S = 10.0
# Answers that may succeed when asked again: request timeout and rate limit.
RETRYABLE_4XX = frozenset({408, 429})
KNOWN_CHANNELS = ("webhook", "slack", "email", "log")


class ChannelError(Exception):
    """A notification was not accepted."""


class TransientError(ChannelError):
    """Not accepted this time; a later attempt may succeed (`retry_after_s`: the receiver's ask)."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class PermanentError(ChannelError):
    """Refused for good: sending the same notification again cannot succeed."""


@dataclass(frozen=True)
class Notification:
    """One outbox row to send: its key, where it goes, and the alert's payload."""

    outbox_id: int
    idempotency_key: str
    channel: str
    kind: str
    rule_id: str
    entity: str
    payload: dict[str, Any]
    attempts: int = 0


class Channel(Protocol):
    def send(self, notification: Notification, log: Any = None) -> None: ...


def _field(payload: dict[str, Any], *names: str, default: str = "") -> str:
    for name in names:
        value = payload.get(name)
        if value not in (None, ""):
            return str(value)
    return default


def rule_name(note: Notification) -> str:
    return _field(note.payload, "rule_name", "name", default=note.rule_id)


def condition_text(payload: dict[str, Any]) -> str:
    """The rule's condition as people read it: `> 11000` or `|z| 4.2 >= 3 (baseline …)`."""
    if "z" in payload or "baseline_mean" in payload:
        z = payload.get("z")
        shown = "?" if z is None else f"{abs(float(z)):.1f}"
        return (
            f"|z| {shown} >= {_field(payload, 'k', default='?')} (baseline mean "
            f"{_field(payload, 'baseline_mean', default='?')}, std "
            f"{_field(payload, 'baseline_std', default='?')}, "
            f"n {_field(payload, 'baseline_n', default='?')})"
        )
    operator, threshold = _field(payload, "operator"), _field(payload, "threshold")
    return f"{operator} {threshold}".strip() or "n/a"


def summary_text(note: Notification) -> str:
    """One line saying what happened, for fallbacks, subjects and log lines: the payload's
    `summary` when the alert lifecycle wrote one."""
    state = {"firing": "FIRING", "repeat": "STILL FIRING", "resolved": "RESOLVED"}
    payload = note.payload
    default = (
        f"[{_field(payload, 'severity', default='info').upper()}] "
        f"{state.get(note.kind, note.kind.upper())}: {rule_name(note)} — {note.entity}: "
        f"{_field(payload, 'metric', default='value')} = {_field(payload, 'value', default='?')} "
        f"({condition_text(payload)})"
    )
    return _field(payload, "summary", default=default)


def one_line(text: str) -> str:
    """`text` without line breaks: a device id cannot add a header to an email or a log line."""
    return " ".join(text.splitlines())


# --- webhook -------------------------------------------------------------------------------------


def webhook_body(note: Notification) -> bytes:
    """The JSON body: the payload plus its idempotency key and kind, covered by the signature."""
    document = {**note.payload, "idempotency_key": note.idempotency_key, "kind": note.kind}
    return json.dumps(document, sort_keys=True, separators=(",", ":"), default=str).encode()


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """`sha256=<hex>` of HMAC-SHA256 over `<timestamp>.<body>` with the shared secret."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(
    secret: str, timestamp: str, body: bytes, signature: str, *, now: float, tolerance_s: int = 300
) -> bool:
    """What a receiver does: the signature matches and the timestamp is recent (no replays)."""
    try:
        fresh = abs(now - int(timestamp)) <= tolerance_s
    except ValueError:
        return False
    return fresh and hmac.compare_digest(sign(secret, timestamp, body), signature)


def _retry_after(response: requests.Response) -> float | None:
    try:
        return float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None  # an HTTP date, or absent: our own backoff applies


def post_json(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> None:
    """POST `body`; classify the outcome as accepted, transient or permanent."""
    try:
        response = requests.post(
            url,
            data=body,
            headers={"Content-Type": "application/json", "User-Agent": USER_AGENT, **headers},
            timeout=(timeout_s, timeout_s),
            # A redirected POST becomes a GET in requests: never accepted, so refuse it plainly.
            allow_redirects=False,
        )
    except requests.Timeout:
        raise TransientError(f"no answer within {timeout_s:g} s") from None
    except requests.RequestException as exc:
        raise TransientError(f"cannot reach the receiver: {type(exc).__name__}") from None
    status = response.status_code
    detail = f"HTTP {status}: {response.text[:200]!r}"
    if 200 <= status < 300:
        return
    if status >= 500 or status in RETRYABLE_4XX:
        raise TransientError(detail, _retry_after(response))
    if 300 <= status < 400:
        raise PermanentError(f"{detail}; redirects are not followed, configure the final URL")
    raise PermanentError(detail)


@dataclass(frozen=True)
class WebhookChannel:
    """JSON POST signed with HMAC-SHA256; the idempotency key lets the receiver drop repeats."""

    url: str
    secret: str = field(repr=False)
    timeout_s: float = HTTP_TIMEOUT_S

    def send(self, notification: Notification, log: Any = None) -> None:
        body = webhook_body(notification)
        timestamp = str(int(time.time()))
        headers = {
            SIGNATURE_HEADER: sign(self.secret, timestamp, body),
            TIMESTAMP_HEADER: timestamp,
            IDEMPOTENCY_HEADER: notification.idempotency_key,
        }
        post_json(self.url, body, headers, self.timeout_s)


# --- Slack ---------------------------------------------------------------------------------------

_SLACK_HEADER = {
    "firing": ":red_circle: Firing",
    "repeat": ":repeat: Still firing",
    "resolved": ":white_check_mark: Resolved",
}


def slack_escape(text: str) -> str:
    """Text safe in Slack mrkdwn: `<!channel>`, `<@user>` or links in a device id stay text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _mrkdwn_field(label: str, value: str) -> dict[str, str]:
    return {"type": "mrkdwn", "text": f"*{label}*\n{slack_escape(value) or 'n/a'}"}


def slack_message(note: Notification) -> dict[str, Any]:
    """An incoming-webhook message: `text` for notifications and old clients, `blocks` to show."""
    payload = note.payload
    header = f"{_SLACK_HEADER.get(note.kind, note.kind)}: {rule_name(note)}"[:150]
    text = slack_escape(summary_text(note))
    entity_type = slack_escape(_field(payload, "entity_type", default="entity"))
    code = slack_escape(note.entity.replace("`", "'"))  # a backtick would end the code span
    entity = f"{entity_type} `{code}`"
    fields = [
        _mrkdwn_field("Severity", _field(payload, "severity", default="info")),
        {"type": "mrkdwn", "text": f"*Entity*\n{entity}"},  # escaped above, code span kept
        _mrkdwn_field(
            "Value", f"{_field(payload, 'metric')} = {_field(payload, 'value', default='?')}"
        ),
        _mrkdwn_field("Condition", condition_text(payload)),
    ]
    times = f"Window {_field(payload, 'window_start')} – {_field(payload, 'window_end')}"
    times += f" · started {_field(payload, 'started_at', default='?')}"
    if note.kind == "resolved":
        # A resolution reads as good news: the end time instead of the window, no call to act.
        fields[2] = {"type": "mrkdwn", "text": fields[2]["text"].replace("*Value*", "*Last value*")}
        times = f"Started {_field(payload, 'started_at', default='?')} · resolved "
        times += _field(payload, "resolved_at", default="?")
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": header, "emoji": True}},
        {"type": "section", "text": {"type": "mrkdwn", "text": text[:3000]}},
        {"type": "section", "fields": fields},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": slack_escape(times)}]},
    ]
    runbook = _field(payload, "runbook_url")
    if runbook.startswith(("http://", "https://")) and note.kind != "resolved":
        button = {"type": "plain_text", "text": "Runbook"}
        blocks.append(
            {
                "type": "actions",
                "elements": [{"type": "button", "text": button, "url": runbook[:3000]}],
            }
        )
    return {"text": text, "blocks": blocks}


@dataclass(frozen=True)
class SlackChannel:
    """A Slack incoming webhook (its URL is the secret)."""

    webhook_url: str = field(repr=False)
    timeout_s: float = HTTP_TIMEOUT_S

    def send(self, notification: Notification, log: Any = None) -> None:
        body = json.dumps(slack_message(notification), default=str).encode()
        post_json(self.webhook_url, body, {}, self.timeout_s)


# --- email ---------------------------------------------------------------------------------------


def message_id(idempotency_key: str, sender: str) -> str:
    """A Message-ID that is the same for every attempt of one notification."""
    digest = hashlib.sha256(idempotency_key.encode()).hexdigest()[:40]
    domain = sender.rpartition("@")[2] or "energy-pipeline.invalid"
    return f"<{digest}@{domain}>"


def _html(note: Notification) -> str:
    from html import escape

    rows = "".join(
        f"<tr><th align='left'>{escape(k)}</th><td>{escape(str(v))}</td></tr>"
        for k, v in sorted(note.payload.items())
        if v is not None
    )
    return (
        f"<html><body><p><b>{escape(summary_text(note))}</b></p><table>{rows}</table></body></html>"
    )


def email_message(note: Notification, sender: str, recipients: tuple[str, ...]) -> EmailMessage:
    """Plain text with an HTML alternative; the Message-ID comes from the idempotency key."""
    msg = EmailMessage()
    msg["Subject"] = one_line(summary_text(note))[:200]
    msg["From"] = sender
    msg["To"] = ", ".join(recipients)
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = message_id(note.idempotency_key, sender)
    msg["X-Energy-Idempotency-Key"] = one_line(note.idempotency_key)
    lines = [summary_text(note), ""]
    lines += [f"{k}: {v}" for k, v in sorted(note.payload.items()) if v is not None]
    msg.set_content("\n".join(lines) + "\n")
    msg.add_alternative(_html(note), subtype="html")
    return msg


@dataclass(frozen=True)
class EmailChannel:
    """SMTP with STARTTLS and AUTH (when a username is set)."""

    host: str
    port: int
    sender: str
    recipients: tuple[str, ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    starttls: bool = True
    timeout_s: float = SMTP_TIMEOUT_S
    # The certificates STARTTLS trusts; None: the system's (and SSL_CERT_FILE's).
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    def send(self, notification: Notification, log: Any = None) -> None:
        msg = email_message(notification, self.sender, self.recipients)
        try:
            with smtplib.SMTP(self.host, self.port, timeout=self.timeout_s) as smtp:
                if self.starttls:
                    smtp.starttls(context=self.ssl_context or ssl.create_default_context())
                if self.username:
                    smtp.login(self.username, self.password or "")
                smtp.send_message(msg)
        except smtplib.SMTPRecipientsRefused as exc:
            raise PermanentError(f"SMTP refused every recipient: {exc.recipients}") from None
        except smtplib.SMTPResponseException as exc:
            reason = f"SMTP {exc.smtp_code}: {exc.smtp_error!r}"
            # 4xx replies are temporary by definition (RFC 5321); 5xx are not.
            raise (TransientError if exc.smtp_code < 500 else PermanentError)(reason) from None
        except ssl.SSLCertVerificationError as exc:
            raise PermanentError(
                f"SMTP server certificate not trusted: {exc.verify_message}"
            ) from None
        except (OSError, smtplib.SMTPException) as exc:
            raise TransientError(f"SMTP {type(exc).__name__}: {exc}") from None


# --- log -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogChannel:
    """One structured line per notification through Python logging (and the Dagster log)."""

    logger: logging.Logger = LOGGER

    def send(self, notification: Notification, log: Any = None) -> None:
        record = {
            "event": "alert_notification",
            "idempotency_key": notification.idempotency_key,
            "kind": notification.kind,
            "rule_id": notification.rule_id,
            "entity": notification.entity,
            "payload": notification.payload,
        }
        line = json.dumps(record, sort_keys=True, default=str)
        summary = one_line(summary_text(notification))
        resolved = notification.kind == "resolved"
        self.logger.log(logging.INFO if resolved else logging.WARNING, "%s %s", summary, line)
        if log is not None:
            (log.info if resolved else log.warning)(f"{summary} {line}")


# --- the set of channels -------------------------------------------------------------------------


@dataclass(frozen=True)
class Channels:
    """The configured channels by name; `log` is always there."""

    webhook: WebhookChannel | None = None
    slack: SlackChannel | None = None
    email: EmailChannel | None = None
    log: LogChannel = field(default_factory=LogChannel)

    def get(self, name: str) -> Channel:
        """The channel called `name`; a PermanentError when it is unknown or not configured."""
        if name not in KNOWN_CHANNELS:
            raise PermanentError(f"unknown channel {name!r} (known: {', '.join(KNOWN_CHANNELS)})")
        channel = getattr(self, name)
        if channel is None:
            variables = {
                "webhook": "ALERT_WEBHOOK_URL and ALERT_WEBHOOK_SECRET",
                "slack": "ALERT_SLACK_WEBHOOK_URL",
                "email": "ALERT_SMTP_HOST, ALERT_SMTP_FROM and ALERT_SMTP_TO",
            }
            raise PermanentError(f"channel {name!r} is not configured (set {variables[name]})")
        return channel
