"""Real receivers on loopback for the alert channels: an HTTP server for webhook and Slack posts,
and an SMTP server with STARTTLS (a trustme certificate) and AUTH, both recording what arrives."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from energy_pipeline.alerts.channels import IDEMPOTENCY_HEADER
from energy_pipeline.devtools.services import LOOPBACK, free_port


@dataclass(frozen=True)
class ReceivedRequest:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    at: float

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def key(self) -> str | None:
        return self.headers.get(IDEMPOTENCY_HEADER)


class HttpReceiver:
    """Records every POST and answers `default_status`, or the next of `statuses` while any
    are queued, after `delay_s` (cut short by setting `release`). `stop_after=n`: the server
    shuts itself down right after answering n requests (later connections are cut without an
    answer, then refused). `restart()` serves again on the same port."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.requests: list[ReceivedRequest] = []
        self.statuses: deque[int] = deque()
        self.default_status = 200
        self.headers: dict[str, str] = {}
        self.delay_s = 0.0
        # Set to end every delay at once (a long delay then does not depend on machine speed).
        self.release = threading.Event()
        self.stop_after: int | None = None
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._down = False
        self._stopping = False

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/hook"

    def start(self) -> HttpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = receiver._answer(self.path, dict(self.headers), body)
                if status is None:
                    self.close_connection = True  # down: cut without an answer
                    return
                receiver.release.wait(receiver.delay_s)
                try:
                    self.send_response(status)
                    for name, value in receiver.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the sender gave up waiting (its timeout)
                receiver._after_answer()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._down = False
        self.release.clear()
        self._server = ThreadingHTTPServer((LOOPBACK, self.port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def _answer(self, path: str, headers: dict[str, str], body: bytes) -> int | None:
        with self._lock:
            if self._down:
                return None
            status = self.statuses.popleft() if self.statuses else self.default_status
            self.requests.append(ReceivedRequest(path, headers, body, status, time.time()))
            # The n-th request is the last one answered: later ones find the server down.
            self._stopping = len(self.requests) == self.stop_after
            self._down = self._stopping
            return status

    def _after_answer(self) -> None:
        if self._stopping:
            self._stopping = False
            threading.Thread(target=self.stop, daemon=True).start()

    def stop(self) -> None:
        self.release.set()  # no handler keeps waiting on a delay
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        self._down = True

    def restart(self) -> HttpReceiver:
        self.stop_after = None
        return self.start()

    def wait_stopped(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self._server is not None and time.monotonic() < deadline:
            time.sleep(0.01)

    # What a receiver deduplicating by idempotency key sees.
    def accepted(self) -> list[ReceivedRequest]:
        return [r for r in self.requests if 200 <= r.status < 300]

    def accepted_keys(self) -> Counter[str | None]:
        return Counter(r.key for r in self.accepted())

    def duplicates(self) -> dict[str | None, int]:
        """Keys accepted more than once: what the receiver's dedupe dropped."""
        return {k: n for k, n in self.accepted_keys().items() if n > 1}


@dataclass
class ReceivedMail:
    message: EmailMessage
    envelope_from: str
    recipients: list[str]
    tls: bool
    login: str | None


@dataclass
class SmtpReceiver:
    """aiosmtpd on loopback: STARTTLS required, then AUTH (PLAIN or LOGIN) required."""

    users: dict[str, str] = field(default_factory=lambda: {"alerts": "smtp-s3cret"})
    port: int = field(default_factory=free_port)
    mails: list[ReceivedMail] = field(default_factory=list)

    def __post_init__(self) -> None:
        ca = trustme.CA()
        server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert(LOOPBACK, "localhost").configure_cert(server_context)
        # What a sender must trust to verify this server's certificate.
        self.client_context = ssl.create_default_context()
        ca.configure_trust(self.client_context)
        self._server_context = server_context

    def start(self) -> SmtpReceiver:
        # A controller's event loop closes when it stops: a fresh one for every start.
        self._controller = Controller(
            self,
            hostname=LOOPBACK,
            port=self.port,
            tls_context=self._server_context,
            require_starttls=True,
            auth_required=True,
            auth_require_tls=True,
            authenticator=self._authenticate,
        )
        self._controller.start()
        return self

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and self.users.get(auth_data.login.decode()) == auth_data.password.decode()
        )
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        raw = envelope.content if isinstance(envelope.content, bytes) else b""
        message = message_from_bytes(raw, policy=policy.default)
        assert isinstance(message, EmailMessage)
        login = session.auth_data.login.decode() if session.auth_data else None
        self.mails.append(
            ReceivedMail(
                message,
                str(envelope.mail_from),
                list(envelope.rcpt_tos),
                tls=session.ssl is not None,
                login=login,
            )
        )
        return "250 OK"

    def stop(self) -> None:
        self._controller.stop()
