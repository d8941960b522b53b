"""Alert channels against real receivers on loopback: a signed webhook, Slack's blocks, email
through STARTTLS and AUTH, the log line; their settings and resource."""

from __future__ import annotations

import json
import logging
import smtplib
import time
from collections.abc import Iterator
from dataclasses import replace

import dagster as dg
import pytest

from energy_pipeline.alerts.channels import (
    IDEMPOTENCY_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Channels,
    EmailChannel,
    LogChannel,
    Notification,
    PermanentError,
    SlackChannel,
    TransientError,
    WebhookChannel,
    message_id,
    sign,
    slack_message,
    verify_signature,
)
from energy_pipeline.config import ConfigError, Settings, scrub
from energy_pipeline.definitions import build_resources
from energy_pipeline.defs.alerts.resources import AlertChannelsResource
from energy_pipeline_tests.receivers import HttpReceiver, SmtpReceiver

SECRET = "whsec-test-2f9c"
PAYLOAD = {
    "rule_id": "ev-night-draw",
    "rule_name": "EV charger above 11 kW at night",
    "kind": "firing",
    "severity": "critical",
    "entity_type": "device",
    "entity": "ev-charger-17",
    "metric": "power_w_avg",
    "value": 11250.0,
    "operator": ">",
    "threshold": 11000.0,
    "window_start": "2026-11-28T03:00:00+00:00",
    "window_end": "2026-11-28T03:01:00+00:00",
    "started_at": "2026-11-28T03:00:00+00:00",
    "resolved_at": None,
    "runbook_url": "https://runbooks.example.org/ev-night-draw",
    "summary": "[CRITICAL] FIRING: EV charger above 11 kW at night — device ev-charger-17: "
    "power_w_avg = 11250 (power_w_avg > 11000) in 2026-11-28 03:00 UTC",
}


def notification(
    kind: str = "firing", key: str = "alert-41:webhook:firing", **payload
) -> Notification:
    return Notification(
        outbox_id=1,
        idempotency_key=key,
        channel="webhook",
        kind=kind,
        rule_id=PAYLOAD["rule_id"],
        entity=PAYLOAD["entity"],
        payload={**PAYLOAD, "kind": kind, **payload},
    )


@pytest.fixture
def receiver() -> Iterator[HttpReceiver]:
    server = HttpReceiver().start()
    yield server
    server.stop()


@pytest.fixture
def smtp() -> Iterator[SmtpReceiver]:
    server = SmtpReceiver().start()
    yield server
    server.stop()


# --- webhook -------------------------------------------------------------------------------------


def test_webhook_signature_verifies_with_the_secret_and_carries_the_key(receiver):
    WebhookChannel(receiver.url, SECRET).send(notification())

    (request,) = receiver.requests
    body, timestamp = request.body, request.headers[TIMESTAMP_HEADER]
    signature = request.headers[SIGNATURE_HEADER]
    assert signature.startswith("sha256=")
    assert verify_signature(SECRET, timestamp, body, signature, now=time.time())
    assert not verify_signature("other-secret", timestamp, body, signature, now=time.time())
    assert not verify_signature(SECRET, timestamp, body + b" ", signature, now=time.time())
    # A captured request replayed later is refused by its timestamp.
    assert not verify_signature(SECRET, timestamp, body, signature, now=time.time() + 3600)
    assert request.headers[IDEMPOTENCY_HEADER] == "alert-41:webhook:firing"
    assert request.headers["Content-Type"] == "application/json"
    document = request.json()
    assert document["idempotency_key"] == "alert-41:webhook:firing"
    assert {k: document[k] for k in PAYLOAD} == PAYLOAD


def test_signature_is_hmac_sha256_of_timestamp_dot_body():
    # Independent of our helper: the recipe documented for receivers.
    import hashlib
    import hmac

    body = b'{"a":1}'
    expected = hmac.new(b"k", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign("k", "1700000000", body) == "sha256=" + expected
    assert not verify_signature("k", "not-a-time", body, "sha256=" + expected, now=1700000000)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, None),
        (204, None),
        (500, TransientError),
        (503, TransientError),
        (408, TransientError),
        (429, TransientError),
        (400, PermanentError),
        (401, PermanentError),
        (404, PermanentError),
        (410, PermanentError),
        (301, PermanentError),
    ],
)
def test_webhook_answers_are_classified(receiver, status, outcome):
    receiver.default_status = status
    receiver.headers = {"Location": "http://127.0.0.1:9/elsewhere"} if status == 301 else {}
    channel = WebhookChannel(receiver.url, SECRET)
    if outcome is None:
        channel.send(notification())
    else:
        with pytest.raises(outcome, match=f"HTTP {status}"):
            channel.send(notification())
    assert len(receiver.requests) == 1  # a redirect is not followed


def test_retry_after_is_passed_on(receiver):
    receiver.default_status = 429
    receiver.headers = {"Retry-After": "120"}
    with pytest.raises(TransientError) as caught:
        WebhookChannel(receiver.url, SECRET).send(notification())
    assert caught.value.retry_after_s == 120.0


def test_slow_or_absent_receiver_is_transient(receiver):
    receiver.delay_s = 60.0  # far beyond the timeout: the send ends long before the answer
    started = time.monotonic()
    with pytest.raises(TransientError, match="no answer within 0.2 s"):
        WebhookChannel(receiver.url, SECRET, timeout_s=0.2).send(notification())
    assert time.monotonic() - started < 30
    receiver.release.set()
    receiver.stop()
    with pytest.raises(TransientError, match="cannot reach the receiver"):
        WebhookChannel(receiver.url, SECRET).send(notification())


# --- Slack ---------------------------------------------------------------------------------------


def test_slack_payload_has_text_and_blocks(receiver):
    SlackChannel(receiver.url).send(notification())

    message = receiver.requests[0].json()
    assert "EV charger above 11 kW at night" in message["text"]
    assert "FIRING: EV charger" in message["text"]
    kinds = [b["type"] for b in message["blocks"]]
    assert kinds == ["header", "section", "section", "context", "actions"]
    header = message["blocks"][0]["text"]
    assert header["type"] == "plain_text" and "Firing" in header["text"]
    fields = {
        f["text"].split("\n")[0]: f["text"].split("\n")[1] for f in message["blocks"][2]["fields"]
    }
    assert fields == {
        "*Severity*": "critical",
        "*Entity*": "device `ev-charger-17`",
        "*Value*": "power_w_avg = 11250.0",
        "*Condition*": "&gt; 11000.0",  # Slack shows escaped mrkdwn as written
    }
    button = message["blocks"][4]["elements"][0]
    assert button["type"] == "button" and button["url"] == PAYLOAD["runbook_url"]


def test_slack_resolved_message_looks_different():
    # Without a summary in the payload, the channel writes its own line.
    resolved = notification("resolved", resolved_at="2026-11-28T03:20:00+00:00", summary=None)
    message = slack_message(resolved)
    header = message["blocks"][0]["text"]["text"]
    assert "Resolved" in header and "Firing" not in header
    assert message["text"].startswith("[CRITICAL] RESOLVED: EV charger above 11 kW at night")
    assert [b["type"] for b in message["blocks"]] == ["header", "section", "section", "context"]
    labels = [f["text"].split("\n")[0] for f in message["blocks"][2]["fields"]]
    assert "*Last value*" in labels
    assert "resolved 2026-11-28T03:20:00+00:00" in message["blocks"][3]["elements"][0]["text"]


def test_slack_keeps_hostile_ids_as_text():
    hostile = "<!channel> & <https://evil.example|click>"
    note = replace(notification(summary=None, entity=hostile), entity=hostile)
    message = slack_message(note)
    shown = json.dumps(message)
    assert "<!channel>" not in shown and "<https://evil" not in shown
    assert "&lt;!channel&gt; &amp; &lt;https://evil.example|click&gt;" in message["text"]
    assert message["blocks"][2]["fields"][1]["text"].endswith(
        "`&lt;!channel&gt; &amp; &lt;https://evil.example|click&gt;`"
    )


def test_slack_shows_an_anomaly_as_z_score_and_baseline():
    anomaly = notification(k=3.0, z=-4.23, baseline_mean=420.5, baseline_std=12.0, baseline_n=7)
    fields = slack_message(anomaly)["blocks"][2]["fields"]
    expected = "|z| 4.2 &gt;= 3.0 (baseline mean 420.5, std 12.0, n 7)"
    assert fields[3]["text"] == f"*Condition*\n{expected}"


# --- email ---------------------------------------------------------------------------------------


def email_channel(smtp: SmtpReceiver, **kwargs) -> EmailChannel:
    settings = dict(
        host="127.0.0.1",
        port=smtp.port,
        sender="alerts@energy.example.org",
        recipients=("oncall@example.org", "owner@example.org"),
        username="alerts",
        password="smtp-s3cret",
        ssl_context=smtp.client_context,
    )
    return EmailChannel(**{**settings, **kwargs})  # type: ignore[arg-type]


def test_email_arrives_through_starttls_with_auth_and_a_stable_message_id(smtp):
    channel = email_channel(smtp)
    channel.send(notification())
    channel.send(notification())  # a resend after a crash: the same Message-ID

    first, second = smtp.mails
    assert first.tls and first.login == "alerts"
    assert first.recipients == ["oncall@example.org", "owner@example.org"]
    expected_id = message_id("alert-41:webhook:firing", "alerts@energy.example.org")
    assert first.message["Message-ID"] == second.message["Message-ID"] == expected_id
    assert expected_id.endswith("@energy.example.org>")
    assert first.message["X-Energy-Idempotency-Key"] == "alert-41:webhook:firing"
    assert first.message["Subject"].startswith("[CRITICAL] FIRING: EV charger")
    assert first.message.get_content_type() == "multipart/alternative"
    text = first.message.get_body(("plain",))
    html = first.message.get_body(("html",))
    assert text is not None and "power_w_avg" in text.get_content()
    assert html is not None and "<table>" in html.get_content()
    other = message_id("alert-41:webhook:resolved", "alerts@energy.example.org")
    assert other != expected_id


def test_line_breaks_in_a_device_id_add_no_header_or_log_line(smtp, caplog):
    hostile = "dev-1\r\nBcc: everyone@example.org\nX-Evil: 1"
    note = replace(notification(summary=None, entity=hostile), entity=hostile)
    email_channel(smtp).send(note)
    (mail,) = smtp.mails
    assert mail.message["Bcc"] is None and mail.message["X-Evil"] is None
    assert mail.recipients == ["oncall@example.org", "owner@example.org"]
    assert "dev-1 Bcc: everyone@example.org X-Evil: 1" in mail.message["Subject"]
    with caplog.at_level(logging.INFO, logger="energy_pipeline.alerts"):
        LogChannel().send(note)
    (record,) = [r for r in caplog.records if r.name == "energy_pipeline.alerts"]
    assert "\n" not in record.getMessage() and "\r" not in record.getMessage()


def test_email_wrong_password_is_permanent(smtp):
    with pytest.raises(PermanentError, match="SMTP 535"):
        email_channel(smtp, password="wrong").send(notification())
    assert smtp.mails == []


def test_email_without_starttls_is_refused_by_the_server(smtp):
    # The server requires STARTTLS; the channel never sends AUTH in clear text.
    with pytest.raises(PermanentError, match="SMTP 530"):
        email_channel(smtp, starttls=False, username=None).send(notification())


def test_email_untrusted_certificate_is_permanent(smtp):
    import ssl

    with pytest.raises(PermanentError, match="certificate not trusted"):
        email_channel(smtp, ssl_context=ssl.create_default_context()).send(notification())


def test_email_server_down_is_transient(smtp):
    smtp.stop()
    with pytest.raises(TransientError, match="SMTP"):
        email_channel(smtp, timeout_s=1.0).send(notification())
    smtp.start()  # the fixture stops it again


def test_smtplib_reports_535_as_authentication_error():
    # The classification above relies on SMTPAuthenticationError being a response exception.
    assert issubclass(smtplib.SMTPAuthenticationError, smtplib.SMTPResponseException)


# --- log -----------------------------------------------------------------------------------------


class RecordingLog:
    """Stands in for a Dagster logger (pure unit test)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def warning(self, msg: str) -> None:
        self.lines.append(("warning", msg))

    def info(self, msg: str) -> None:
        self.lines.append(("info", msg))


def test_log_channel_writes_one_structured_line(caplog):
    dagster_log = RecordingLog()
    with caplog.at_level(logging.INFO, logger="energy_pipeline.alerts"):
        LogChannel().send(notification(), dagster_log)
        LogChannel().send(notification("resolved"), dagster_log)
    firing, resolved = caplog.records
    assert firing.levelno == logging.WARNING and resolved.levelno == logging.INFO
    text = firing.getMessage()
    line = json.loads(text[text.index("{") :])
    assert line["idempotency_key"] == "alert-41:webhook:firing"
    assert line["payload"]["value"] == 11250.0
    assert [level for level, _ in dagster_log.lines] == ["warning", "info"]


# --- the set of channels, settings, resource -----------------------------------------------------


def test_unknown_or_unconfigured_channel_is_a_permanent_error():
    channels = Channels()
    assert isinstance(channels.get("log"), LogChannel)
    with pytest.raises(PermanentError, match="unknown channel 'pager'"):
        channels.get("pager")
    with pytest.raises(PermanentError, match="not configured.*ALERT_SLACK_WEBHOOK_URL"):
        channels.get("slack")


ALERT_ENV = {
    "ALERT_WEBHOOK_URL": "https://hooks.example.org/energy",
    "ALERT_WEBHOOK_SECRET": "whsec-env-77",
    "ALERT_SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T0/B0/xyzSECRET",
    "ALERT_SMTP_HOST": "smtp.example.org",
    "ALERT_SMTP_PORT": "2525",
    "ALERT_SMTP_USERNAME": "alerts",
    "ALERT_SMTP_PASSWORD": "smtp-env-pw",
    "ALERT_SMTP_FROM": "alerts@example.org",
    "ALERT_SMTP_TO": "a@example.org, b@example.org",
    "ALERT_SMTP_STARTTLS": "true",
}


def test_alert_settings_load_and_secrets_reach_the_resource_as_env_vars():
    settings = Settings.from_env(ALERT_ENV)
    assert settings.alert_smtp_to == ("a@example.org", "b@example.org")
    assert settings.alert_smtp_port == 2525 and settings.alert_smtp_starttls
    assert "xyzSECRET" not in repr(settings) and "smtp-env-pw" not in repr(settings)
    resource = build_resources(settings)["alert_channels"]
    assert isinstance(resource, AlertChannelsResource)
    for name in ("webhook_secret", "slack_webhook_url", "smtp_password"):
        assert isinstance(getattr(resource, name), dg.EnvVar), name
    assert resource.webhook_url == "https://hooks.example.org/energy"


def test_resource_builds_the_configured_channels_only():
    channels = AlertChannelsResource(
        webhook_url="http://127.0.0.1:1/h", webhook_secret="s", smtp_host="127.0.0.1"
    ).channels()
    assert isinstance(channels.webhook, WebhookChannel)
    assert channels.slack is None
    assert channels.email is None  # no sender or recipients: not configured
    assert isinstance(channels.log, LogChannel)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ALERT_WEBHOOK_SECRET": ""}, "ALERT_WEBHOOK_SECRET must be set"),
        ({"ALERT_WEBHOOK_URL": "hooks.example.org"}, "ALERT_WEBHOOK_URL must look like"),
        ({"ALERT_SLACK_WEBHOOK_URL": "xyzSECRET"}, "value not shown"),
        ({"ALERT_SMTP_PORT": "70000"}, "ALERT_SMTP_PORT must be between"),
        ({"ALERT_SMTP_TO": ""}, "ALERT_SMTP_FROM and ALERT_SMTP_TO"),
        ({"ALERT_SMTP_TO": "nobody"}, "ALERT_SMTP_TO must hold email addresses"),
        ({"ALERT_SMTP_PASSWORD": ""}, "ALERT_SMTP_PASSWORD must be"),
        ({"ALERT_SMTP_STARTTLS": "false"}, "clear text"),
        ({"ALERT_SMTP_STARTTLS": "maybe"}, "ALERT_SMTP_STARTTLS must be true or false"),
    ],
)
def test_bad_alert_settings_name_the_variable(change, message):
    with pytest.raises(ConfigError, match=message) as caught:
        Settings.from_env({**ALERT_ENV, **change})
    assert "xyzSECRET" not in str(caught.value)


def test_no_alert_settings_leave_only_the_log_channel():
    settings = Settings.from_env({})
    channels = build_resources(settings)["alert_channels"].channels()  # type: ignore[attr-defined]
    assert (channels.webhook, channels.slack, channels.email) == (None, None, None)


def test_failures_never_show_the_slack_url(receiver):
    # The incoming-webhook URL is the credential: no error text may carry it.
    secret_path = "/services/T000/B000/xyzSECRETpath"
    receiver.delay_s = 1.0
    slow = SlackChannel(f"http://127.0.0.1:{receiver.port}{secret_path}", timeout_s=0.2)
    with pytest.raises(TransientError) as timed_out:
        slow.send(notification())
    receiver.stop()
    with pytest.raises(TransientError) as refused:
        slow.send(notification())
    for caught in (timed_out, refused):
        assert "xyzSECRET" not in str(caught.value) and caught.value.__cause__ is None


def test_definitions_hold_the_delivery_sensor_and_the_channels_resource():
    from energy_pipeline.definitions import build_definitions

    defs = build_definitions(Settings.from_env(ALERT_ENV))
    sensor = defs.get_sensor_def("alert_delivery_sensor")
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.minimum_interval_seconds == 15
    assert not sensor.targets  # it delivers in the tick and launches no runs
    assert isinstance(defs.resources["alert_channels"], AlertChannelsResource)


@pytest.mark.parametrize(
    "url",
    ["https://hooks.example.org/e?token=tokSECRET9", "https://u:tokSECRET9@hooks.example.org/e"],
)
def test_a_webhook_url_carrying_a_token_reaches_the_resource_as_an_env_var(url):
    settings = Settings.from_env({**ALERT_ENV, "ALERT_WEBHOOK_URL": url})
    resource = build_resources(settings)["alert_channels"]
    assert isinstance(resource, AlertChannelsResource)
    assert isinstance(resource.webhook_url, dg.EnvVar)
    assert resource.webhook_url.env_var_name == "ALERT_WEBHOOK_URL"
    assert "tokSECRET9" not in repr(resource)


def test_cli_tracebacks_are_scrubbed_of_the_alert_secrets(monkeypatch):
    from energy_pipeline.cli import _env_secrets

    env = {**ALERT_ENV, "ALERT_WEBHOOK_URL": "https://hooks.example.org/e?token=tokSECRET9"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    text = scrub(f"failed: {' '.join(env.values())}", _env_secrets())
    for secret in ("whsec-env-77", "xyzSECRET", "smtp-env-pw", "tokSECRET9"):
        assert secret not in text, secret
    assert "hooks.example.org/e" in text  # the rest of the URL stays readable


def test_the_alert_modules_do_not_import_dagster():
    # Layering: Dagster lives in energy_pipeline.defs.alerts; a fresh interpreter proves it.
    import subprocess
    import sys

    modules = ("channels", "contracts", "delivery", "evaluate", "lifecycle", "rules")
    code = (
        "import sys\n"
        + "".join(f"import energy_pipeline.alerts.{m}\n" for m in modules)
        + "print('dagster' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
