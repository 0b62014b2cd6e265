"""Transport objects for the specs of [delivery] transport and routes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .. import runtime
from ..config import Config, DeliveryConfig
from ..delivery.auth import Credentials
from ..delivery.base import Transport
from ..delivery.client import Timeouts
from ..delivery.lmtp import LmtpTransport
from ..delivery.probe import PROBE_TIMEOUTS, LmtpProbe, RcptProbe, SmtpProbe
from ..delivery.smtp import SmtpTransport, TlsPolicy, is_smtp, parse_smtp
from ..store.maildir import Maildir
from .bounce import Bouncer
from .local import MaildirAgent
from .manager import DeliveryObserver, Manager
from .routing import MAILDIR
from .store import QueueStore


def smtp_timeouts(d: DeliveryConfig) -> Timeouts:
    return Timeouts(connect=d.smtp_connect_timeout, command=d.smtp_command_timeout,
                    data_init=d.smtp_data_init_timeout, data_xfer=d.smtp_data_xfer_timeout,
                    data_done=d.smtp_data_done_timeout)


def build(spec: str, maildir: Maildir, max_connections: int,
          delivery: DeliveryConfig | None = None, auth: Credentials | None = None) -> Transport:
    """The transport for `spec`: the queue's maildir agent, or an LMTP or SMTP client whose
    connection pool matches the per-destination concurrency."""
    if spec == MAILDIR:
        return MaildirAgent(maildir)
    if is_smtp(spec):
        d = delivery or DeliveryConfig()
        hop = parse_smtp(spec)
        return SmtpTransport(hop, max_connections=max_connections, executor=maildir.executor,
                             helo_name=maildir.hostname, timeouts=smtp_timeouts(d),
                             tls=TlsPolicy(d.smtp_tls, d.smtp_tls_ca_file),
                             auth=(auth or {}).get(hop))
    return LmtpTransport(spec, max_connections=max_connections, executor=maildir.executor,
                         lhlo_name=maildir.hostname)


def hop_probe(spec: str, delivery: DeliveryConfig, helo_name: str,
              auth: Credentials) -> RcptProbe:
    """relay_recipients = "smtp": asks the hop `spec` as its transport talks to it (EHLO name,
    STARTTLS, AUTH), with the probe's short timeouts (a client waits for our RCPT reply)."""
    if is_smtp(spec):
        hop = parse_smtp(spec)
        return SmtpProbe(SmtpTransport(hop, helo_name=helo_name, timeouts=PROBE_TIMEOUTS,
                                       tls=TlsPolicy(delivery.smtp_tls, delivery.smtp_tls_ca_file),
                                       auth=auth.get(hop)))
    return LmtpProbe(spec, lhlo_name=helo_name)


def manager(config: Config, maildir: Maildir, concurrency: Callable[[], int],
            observer: DeliveryObserver) -> Manager:
    """The delivery manager of [delivery] queue_dir, as the daemon (workers = 1) and the
    supervisor (workers > 1) each run it: one per queue, whichever process hosts it."""
    d = config.delivery
    auth = runtime.relay_auth(d.relay_auth_file)  # checked by runtime.problems before start
    store = QueueStore(Path(d.queue_dir))
    # The current config (a reload replaces the manager's) routes each bounce.
    bouncer = Bouncer(store, lambda: m.config, maildir.hostname)
    m = Manager(config, store, lambda spec: build(spec, maildir, d.destination_concurrency, d,
                                                  auth),
                concurrency, maildir.executor, observer=observer, bounce=bouncer,
                warn=bouncer.warn)
    return m
