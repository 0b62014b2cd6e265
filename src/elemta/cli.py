"""Command line: elemta serve | check-config | stats | queue | mailbox add/list | note-exit |
--version."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import __version__, config, runtime
from .observe import logging as elemta_logging
from .workerplan import WorkerPlan

if TYPE_CHECKING:  # the module itself is imported only when serving
    from .observe.systemd import InheritedSockets

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2  # systemd's RestartPreventExitStatus=2: a config error is not retried


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="elemta",
        description="SMTP daemon that knows its memory ceiling and answers 4xx instead of "
        "being OOM-killed.",
        epilog="Signals: SIGTERM/SIGINT drain and stop, SIGHUP reloads the config file. "
        "Under systemd: Type=notify (READY/STATUS/RELOADING/STOPPING), watchdog, socket "
        "activation (FileDescriptorName=smtp|api). "
        "[server] workers = \"auto\" (default: the usable CPUs, capped so that the workers' "
        "baseline memory stays within 25% of the memory limit; logged at start, shown by "
        "check-config --explain) or N: with more than one, a supervisor forks the worker "
        "processes on the SMTP sockets (restarts dead or hung ones; serves the admin endpoint "
        "and talks to systemd for all of them). "
        "Exit status: 0 ok, 1 runtime failure, 2 configuration error. See elemta(8).",
    )
    p.add_argument("--version", action="version", version=f"elemta {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cfg_help = f"config file (default: {config.DEFAULT_CONFIG_PATH} if it exists, else built-in)"
    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--config", "-c", metavar="PATH", help=cfg_help)
    check = sub.add_parser(
        "check-config", help="validate the config and print the effective configuration"
    )
    check.add_argument("--config", "-c", metavar="PATH", help=cfg_help)
    check.add_argument("--explain", action="store_true",
                       help="instead of the configuration, print the memory limit the daemon "
                       "would use on this machine, its source, the headroom, the worst case "
                       "and the number of workers")
    stats = sub.add_parser(
        "stats", help="print the running daemon's /api/stats (sending the bearer token of "
        "[api] token_file when the config is read: without --api, or with --config)"
    )
    stats.add_argument("--api", metavar="URL",
                       help="admin endpoint base URL (default: from [api] listen in the config)")
    stats.add_argument("--json", action="store_true", help="print the raw JSON document")
    stats.add_argument("--config", "-c", metavar="PATH", help=cfg_help)
    stats.add_argument("--watch", "-w", metavar="SECONDS", nargs="?", type=float, const=2.0,
                       help="refresh every SECONDS (default 2) in place until Ctrl-C, with "
                       "rates since the last refresh; with --json one document per line")
    load = sub.add_parser(
        "loadtest", help="drive N concurrent SMTP sessions at a daemon and report rate, "
        "replies by code, latency and (with --api) the daemon's memory")
    load.add_argument("target", nargs="?", metavar="HOST:PORT",
                      help="SMTP server (default: the first [server] listen of the config); "
                      "loopback only unless --allow-remote")
    load.add_argument("--connections", "-n", type=int, default=50, metavar="N",
                      help="concurrent sessions (default 50)")
    load.add_argument("--size", "-s", default="10KiB", metavar="SIZE[:W],...",
                      help="message size, or sizes with relative weights, e.g. "
                      "1KiB:70,100KiB:25,5MiB:5 (default 10KiB)")
    load.add_argument("--per-connection", "-m", type=int, default=1, metavar="M",
                      help="messages per connection (default 1)")
    stop = load.add_mutually_exclusive_group()
    stop.add_argument("--count", type=int, metavar="N",
                      help="messages to attempt in all (default 1000 unless --duration)")
    stop.add_argument("--duration", "-d", metavar="TIME", help="run this long, e.g. 30s, 2m")
    load.add_argument("--ramp", metavar="TIME", default="0s",
                      help="start the sessions evenly over this time (default 0s)")
    load.add_argument("--from", dest="sender", default="loadtest@localhost", metavar="ADDR")
    load.add_argument("--to", dest="recipient", default="postmaster@localhost", metavar="ADDR",
                      help="recipient (default postmaster@localhost, a mailbox elemta makes "
                      "at start when localhost is in [delivery] domains)")
    load.add_argument("--timeout", default="60s", metavar="TIME",
                      help="wait this long for each reply (default 60s)")
    load.add_argument("--api", metavar="URL", help="poll URL/api/stats every second: the "
                      "daemon's memory utilization, state and breaker in the progress line")
    load.add_argument("--allow-remote", action="store_true",
                      help="allow a target that is not a loopback address")
    load.add_argument("--json", action="store_true",
                      help="print the final report as JSON (no progress line)")
    load.add_argument("--config", "-c", metavar="PATH", help=cfg_help + "; for the default "
                      "target and the [api] token_file token")
    queue = sub.add_parser(
        "queue", help="list or act on the running daemon's delivery queue (like mailq, "
        "postqueue and postsuper), through its admin endpoint")
    queue.add_argument("verb", nargs="?", default="list",
                       choices=("list", "show", "flush", "delete", "hold", "release"),
                       help="list (default); show ID; flush [ID] (retry now); delete ID; "
                       "hold ID; release ID")
    queue.add_argument("id", nargs="?", metavar="ID", help="queue id (12 hex digits)")
    queue.add_argument("--api", metavar="URL",
                       help="admin endpoint base URL (default: from [api] listen in the config)")
    queue.add_argument("--json", action="store_true", help="print the raw JSON document")
    queue.add_argument("--config", "-c", metavar="PATH", help=cfg_help)
    mailbox = sub.add_parser(
        "mailbox", help="create or list mailboxes (with the default [delivery] recipients = "
        "\"maildir\", only these receive mail)")
    boxes = mailbox.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = boxes.add_parser(
        "add", help="create the Maildir of each ADDRESS under maildir_root (0700; run as root, "
        "owned by the owner of maildir_root)")
    add.add_argument("addresses", nargs="+", metavar="ADDRESS", help="user@domain, domain in "
                     "[delivery] domains")
    add.add_argument("--config", "-c", metavar="PATH", help=cfg_help)
    listing = boxes.add_parser("list", help="print every mailbox of [delivery] domains, one "
                               "address per line")
    listing.add_argument("--count", action="store_true",
                         help="append the number of messages (new/ and cur/)")
    listing.add_argument("--config", "-c", metavar="PATH", help=cfg_help)
    sub.add_parser(
        "note-exit", help="for the unit's ExecStopPost=: keep how this run ended ($SERVICE_RESULT, "
        "$EXIT_CODE, $EXIT_STATUS) in $STATE_DIRECTORY/last-exit; the next start logs an unclean "
        "end (previous_run_failed) and shows it in systemctl status")
    return p


def note_exit() -> int:
    """ExecStopPost=: record systemd's verdict on the run that just ended (exitnote.py)."""
    import time

    from . import exitnote

    note = exitnote.from_environ(os.environ, time.time())
    directory = exitnote.state_dir(os.environ)
    if note is None or directory is None:  # not run by systemd as ExecStopPost=: nothing to keep
        return EXIT_OK
    try:
        exitnote.record(directory, note)
    except OSError as exc:
        print(f"elemta note-exit: cannot write {directory / exitnote.NOTE_FILE}: {exc.strerror}",
              file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _previous_run(log: logging.Logger) -> str | None:
    """Log how the previous run ended when it ended badly (as `note-exit` recorded it); the
    note for STATUS=, else None."""
    import time

    from . import exitnote
    from .events import emit

    directory = exitnote.state_dir(os.environ)
    note = exitnote.take(directory) if directory is not None else None
    what = exitnote.describe(note) if note is not None else None
    if note is None or what is None:
        return None
    emit(log, "previous_run_failed", f"previous run: {what}", result=note.result,
         exit_code=note.code, exit_status=note.status,
         ended_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(note.at)))
    return f"restarted after {what}"


def mailbox(action: str, path: str | None, addresses: Sequence[str], count: bool) -> int:
    from pathlib import Path

    from . import mailboxes
    from .recipients import RecipientRefusal, parse_mailbox
    from .store.maildir import Mailbox

    cfg = _load(path)
    if cfg is None:
        return EXIT_CONFIG
    root, domains = Path(cfg.delivery.maildir_root), cfg.delivery.domains
    if action == "list":
        try:
            for box in mailboxes.existing(root, domains):
                print(f"{box} {mailboxes.count_messages(root, box)}" if count else box)
        except OSError as exc:
            print(f"elemta: cannot list {root}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_FAILURE
        return EXIT_OK
    wanted: list[Mailbox] = []
    for address in addresses:
        parsed = parse_mailbox(address, domains) if "@" in address else RecipientRefusal.BAD_SYNTAX
        if parsed is RecipientRefusal.FOREIGN_DOMAIN:
            domain = address.rpartition("@")[2].lower()
            print(f"elemta: {address}: {domain} is not in [delivery] domains "
                  f"({cfg.source}: {', '.join(domains)})", file=sys.stderr)
            return EXIT_CONFIG
        if isinstance(parsed, RecipientRefusal):
            print(f"elemta: {address}: not a mailbox address (local@domain; letters, digits "
                  "and !#$%&'*+=?^_`{|}~- in dot-separated local parts)", file=sys.stderr)
            return EXIT_CONFIG
        wanted.append(parsed)
    for box in wanted:
        try:
            made = mailboxes.create(root, box)
        except OSError as exc:
            print(f"elemta: {box}: cannot create its Maildir under {root}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return EXIT_FAILURE
        print(f"{box}: {'created' if made else 'exists'} ({root / box.domain / box.localpart})")
    return EXIT_OK


def _admin_target(api: str | None, path: str | None) -> tuple[str, bytes | None] | None:
    """The admin endpoint's URL and bearer token: `api` as given, else [api] listen of the
    config, with the token of its [api] token_file; None (after one line on stderr) when the
    config or the token file is unusable."""
    from .observe import statsview

    token = None
    if api is None or path is not None:
        cfg = _load(path)
        if cfg is None:
            return None
        api = api or statsview.default_url(cfg.api.listen)
        try:
            token = runtime.api_token(cfg.api.token_file)
        except runtime.SetupError as exc:
            print(f"elemta: {config.locate(cfg, exc.section, exc.key)}: {exc.problem}",
                  file=sys.stderr)
            return None
    assert api is not None
    return api, token


def stats(api: str | None, path: str | None, as_json: bool, watch: float | None = None) -> int:
    from .observe import statsview

    target = _admin_target(api, path)
    if target is None:
        return EXIT_CONFIG
    api, token = target
    if watch is not None:
        return stats_watch(api, token, as_json, watch)
    try:
        doc = statsview.fetch(api, token)
    except statsview.StatsError as exc:
        print(f"elemta: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n" if as_json else statsview.render(doc))
        sys.stdout.flush()
    except BrokenPipeError:  # `elemta stats | head`: as the Python docs advise, no second
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # error at exit
    return EXIT_OK


def queue(verb: str, qid: str | None, api: str | None, path: str | None, as_json: bool) -> int:
    from .queue import view

    if verb in ("show", "delete", "hold", "release") and not qid:
        print(f"elemta: queue {verb} needs a queue ID", file=sys.stderr)
        return EXIT_CONFIG
    if verb == "list" and qid:
        verb = "show"
    target = _admin_target(api, path)
    if target is None:
        return EXIT_CONFIG
    api, token = target
    method, sub = {"list": ("GET", ""), "show": ("GET", f"/{qid}"),
                   "flush": ("POST", f"/{qid}/flush" if qid else "/flush")}.get(
        verb, ("POST", f"/{qid}/{verb}"))
    try:
        doc = view.request(api, method, sub, token)
    except view.QueueError as exc:
        print(f"elemta: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if as_json:
        text = json.dumps(doc, indent=2) + "\n"
    elif verb == "list":
        text = view.render_list(doc)
    elif verb == "show":
        text = view.render_message(doc)
    else:
        text = str(doc.get("result", "")) + "\n"
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


def stats_watch(api: str, token: bytes | None, as_json: bool, every: float) -> int:
    """`elemta stats --watch`: a frame every `every` seconds until Ctrl-C (exit 0). An
    unreachable daemon is shown in the frame, not fatal: it may be restarting."""
    import time

    from .observe import statsview

    if every <= 0:
        print("elemta: --watch SECONDS must be positive", file=sys.stderr)
        return EXIT_CONFIG
    tty = sys.stdout.isatty()
    prev: tuple[float, dict[str, object]] | None = None
    try:
        while True:
            started = time.monotonic()
            doc, error = None, None
            try:
                doc = statsview.fetch(api, token)
            except statsview.StatsError as exc:
                error = f"elemta: {exc}"
            if as_json:
                out = json.dumps(doc if doc is not None else {"error": error}) + "\n"
            else:
                rate = None
                if doc is not None and prev is not None:
                    rate = statsview.rates(prev[1], doc, started - prev[0])
                header = (f"every {every:g}s: {api}/api/stats  "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}  (Ctrl-C quits)")
                out = (statsview.CLEAR if tty else "") + statsview.frame(doc, error, header, rate)
                out += "" if tty else "\n"
            sys.stdout.write(out)
            sys.stdout.flush()
            if doc is not None:
                prev = (started, doc)
            time.sleep(max(0.0, every - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return EXIT_OK
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def loadtest(args: argparse.Namespace) -> int:
    """`elemta loadtest`: see loadtest.py. Exit 0 when the run completed (whatever the server
    answered), 2 for a bad option or a target that is not loopback without --allow-remote."""
    from . import loadtest as lt
    from .observe import statsview
    from .units import parse_duration

    def bad(problem: str) -> int:
        print(f"elemta: loadtest: {problem}", file=sys.stderr)
        return EXIT_CONFIG

    target, token = args.target, None
    if target is None or args.config is not None:
        cfg = _load(args.config)
        if cfg is None:
            return EXIT_CONFIG
        if target is None:
            a = cfg.server.listen[0]
            target = f"[{a.host}]:{a.port}" if ":" in a.host else f"{a.host}:{a.port}"
        try:
            token = runtime.api_token(cfg.api.token_file)
        except runtime.SetupError as exc:
            return bad(f"{config.locate(cfg, exc.section, exc.key)}: {exc.problem}")
    host, sep, port_text = target.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return bad(f"target {target!r}: expected HOST:PORT")
    try:
        sizes = lt.SizeDistribution.parse(args.size)
        durations = {k: parse_duration(getattr(args, k)) for k in ("ramp", "timeout")}
        duration = parse_duration(args.duration) if args.duration is not None else None
        if args.connections < 1 or args.per_connection < 1 or (args.count or 1) < 1:
            raise lt.LoadtestError("--connections, --per-connection and --count must be >= 1")
        if durations["timeout"] <= 0 or (duration is not None and duration <= 0):
            raise lt.LoadtestError("--timeout and --duration must be positive")
        lt.check_target(host, int(port_text), args.allow_remote)
    except (lt.LoadtestError, ValueError) as exc:
        return bad(str(exc))
    plan = lt.Plan(host=host, port=int(port_text), sessions=args.connections, sizes=sizes,
                   per_connection=args.per_connection,
                   count=args.count if args.count or duration is not None else 1000,
                   duration=duration, ramp=durations["ramp"], sender=args.sender,
                   recipient=args.recipient, timeout=durations["timeout"])
    fetch = None
    if args.api:
        api = args.api

        def fetch() -> dict[str, object]:
            return statsview.fetch(api, token)

    tty = sys.stderr.isatty()

    def show(line: str) -> None:
        sys.stderr.write(f"\r\x1b[K{line}" if tty else f"{line}\n")
        sys.stderr.flush()

    title = (f"elemta loadtest: {target}, {plan.sessions} sessions, {plan.per_connection} "
             f"message(s) per connection, size {sizes.describe()}, "
             + (f"{plan.count} messages" if plan.count is not None else f"{duration:g}s")
             + (f", ramp {plan.ramp:g}s" if plan.ramp else ""))
    if not args.json:
        print(title, file=sys.stderr)
    try:
        results = asyncio.run(lt.run(plan, fetch, None if args.json else show))
    except KeyboardInterrupt:
        print("\nelemta: loadtest interrupted", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps({"target": target, "plan": {
            "sessions": plan.sessions, "per_connection": plan.per_connection,
            "sizes": dict(zip(map(str, sizes.sizes), sizes.weights, strict=True)),
            "count": plan.count, "duration": plan.duration, "ramp": plan.ramp},
            **lt.summary(results)}, indent=2))
    else:
        if tty:
            sys.stderr.write("\n")
        sys.stdout.write(lt.table(results, title))
    return EXIT_OK


def _load(path: str | None, *, resources: bool = False) -> config.Config | None:
    """The config, or None after one line per problem on stderr. `resources`: also check that
    what the daemon builds from it (certificate, token file, host name) can be built."""
    try:
        cfg = config.load(path)
    except config.ConfigError as exc:
        problems = exc.problems
    else:
        problems = runtime.problems(cfg) if resources else []
        if not problems:
            return cfg
    for line in problems:
        print(f"elemta: {line}", file=sys.stderr)
    return None


def check_config(path: str | None, explain: bool = False) -> int:
    from . import capacity

    cfg = _load(path, resources=True)
    if cfg is None:
        return EXIT_CONFIG
    machine, sample = capacity.read_machine()
    for warning in (*config.warnings(cfg), *capacity.warnings(cfg, machine)):
        print(f"elemta: warning: {warning}", file=sys.stderr)
    if explain:
        sys.stdout.write("".join(f"{line}\n" for line in capacity.explain(cfg, machine, sample)))
    else:
        sys.stdout.write(config.to_toml(cfg))
    return EXIT_OK


def _event_loop(name: str) -> None:
    """[server] event_loop: "auto" means asyncio (uvloop measured no faster; see elemta.toml(5))."""
    if name == "uvloop":
        import importlib

        uvloop = importlib.import_module("uvloop")
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def serve(path: str | None) -> int:
    cfg = _load(path, resources=True)
    if cfg is None:
        return EXIT_CONFIG
    plan = runtime.worker_plan(cfg)
    if plan.count > 1:
        return serve_workers(cfg, plan)
    from .daemon import Daemon

    log, inherited, previous = _starting(cfg, plan, "")

    def run() -> int:
        daemon = Daemon(cfg, inherited_smtp=inherited.smtp, inherited_api=inherited.api)
        if previous is not None:
            daemon.systemd.note("previous run", previous)
        asyncio.run(daemon.run())
        return EXIT_OK

    return _run_or_say_why(log, cfg, run)


def _run_or_say_why(log: logging.Logger, cfg: config.Config, run: Callable[[], int]) -> int:
    """`run()`'s exit status; a set-up error (exit 2: restarting cannot help) or an OSError
    (exit 1) as one line instead of a traceback."""
    try:
        return run()
    except runtime.SetupError as exc:
        log.error("cannot start: %s: %s", cfg.source, exc)
        return EXIT_CONFIG
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_FAILURE


def _starting(cfg: config.Config, plan: WorkerPlan,
              workers: str) -> tuple[logging.Logger, InheritedSockets, str | None]:
    """Logging and event loop set up, the start-up lines written (`workers`: what follows
    "starting (config: ...)"); the sockets systemd passed (socket activation, elemta.socket:
    else [server] listen is bound) and the previous run's note for STATUS= (_previous_run)."""
    from .observe.systemd import inherited_sockets

    elemta_logging.setup(cfg.logging)
    _event_loop(cfg.server.event_loop)
    log = logging.getLogger("elemta")
    log.info("elemta %s starting (config: %s)%s", __version__, cfg.source, workers)
    _log_plan(log, plan)
    for warning in config.warnings(cfg):
        log.warning("%s", warning)
    previous = _previous_run(log)
    inherited = inherited_sockets()
    if inherited.smtp:
        log.info("using %d SMTP socket(s) passed by systemd; [server] listen is not used",
                 len(inherited.smtp))
    return log, inherited, previous


def _log_plan(log: logging.Logger, plan: WorkerPlan) -> None:
    log.info("workers: %s: %s", plan.describe(), plan.explain())


def serve_workers(cfg: config.Config, plan: WorkerPlan) -> int:
    """More than one worker: the supervisor (supervisor.py)."""
    from . import supervisor  # imports no prometheus_client at module level

    metrics_dir = supervisor.prepare_metrics_dir()  # before anything loads prometheus_client
    try:
        from .daemon import bind

        log, inherited, previous = _starting(cfg, plan, f" with {plan.count} workers")

        def run() -> int:
            socks = inherited.smtp or [bind(a) for a in cfg.server.listen]

            async def supervise() -> int:
                api = inherited.api[0] if inherited.api else None
                sup = supervisor.Supervisor(cfg, socks, api, workers=plan.count)
                if previous is not None:
                    sup.systemd.note("previous run", previous)
                return await sup.run()

            return asyncio.run(supervise())

        return _run_or_say_why(log, cfg, run)
    finally:
        supervisor.remove_metrics_dir(metrics_dir)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.config, args.explain)
    if args.command == "stats":
        return stats(args.api, args.config, args.json, args.watch)
    if args.command == "queue":
        return queue(args.verb, args.id, args.api, args.config, args.json)
    if args.command == "loadtest":
        return loadtest(args)
    if args.command == "note-exit":
        return note_exit()
    if args.command == "mailbox":
        return mailbox(args.action, args.config, getattr(args, "addresses", ()),
                       getattr(args, "count", False))
    return serve(args.config)


if __name__ == "__main__":
    sys.exit(main())
