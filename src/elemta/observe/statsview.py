"""`elemta stats`: fetch /api/stats and render it for a human (aligned table, sizes in MiB)."""

from __future__ import annotations

from typing import Any

from ..adminclient import AdminError, request_json
from ..config import ListenAddress

TIMEOUT = 5.0


class StatsError(Exception):
    pass


def default_url(listen: ListenAddress) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen.host, listen.host)
    return f"http://[{host}]:{listen.port}" if ":" in host else f"http://{host}:{listen.port}"


def fetch(base: str, token: bytes | None = None) -> dict[str, Any]:
    """GET /api/stats, with `Authorization: Bearer` when a token is given ([api] token_file)."""
    try:
        return request_json(base.rstrip("/") + "/api/stats", TIMEOUT, token=token)
    except AdminError as exc:
        raise StatsError(str(exc)) from None


def mib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 1048576:.1f} MiB"


def _term(t: dict[str, Any]) -> str:
    """"host 95.00% (22.8 GiB of 24.0 GiB)"."""
    return (f"{t['term']} {t['percent']:.2f}% ({mib(t['usage_bytes'])} of "
            f"{mib(t['ceiling_bytes'])})")


def _duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{s:02d}"


def rows(doc: dict[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = [
        ("version", str(doc.get("version", "?"))),
        ("uptime", _duration(float(doc.get("uptime_seconds", 0)))),
    ]
    mem = doc.get("memory")
    if mem is None:
        out.append(("memory", "no governor sample yet"))
    else:
        t = mem["thresholds"]
        out += [
            ("memory state", f"{mem['state']} (breaker {doc.get('breaker')})"),
            ("memory usage", f"{mib(mem['usage_bytes'])} of {mib(mem['limit_bytes'])} "
                             f"({mem['utilization_percent']:.2f}%), elemta's own "
                             f"({mem['usage_source']})"),
            ("limit source", str(mem["limit_source"])),
            ("binding term", _term(mem["binding"])),
            ("terms", ", ".join(_term(t) for t in mem["terms"].values())),
            ("thresholds", f"warning {t['warning']:.2f}, gc {t['gc']:.2f}, "
                           f"critical {t['critical']:.2f}"),
            ("processes", f"PSS {mib(mem['process_pss_bytes'])}, RSS summed "
                          f"{mib(mem['process_rss_bytes'])}"),
            ("session buffers", mib(mem["session_bytes"])),
            ("host RAM", f"{mib(mem['host']['available_bytes'])} available of "
                         f"{mib(mem['host']['total_bytes'])}"),
        ]
        cg = mem.get("cgroup")
        if cg is not None:
            out += [
                ("cgroup", f"v{cg['version']} {cg['path']}"),
                ("cgroup usage", f"{mib(cg['current_bytes'])} (working set "
                                 f"{mib(cg['working_set_bytes'])}), limit "
                                 f"{mib(cg['limit_bytes']) if cg['limit_bytes'] else 'none'}"),
            ]
            if cg.get("events"):
                out.append(("cgroup events", ", ".join(f"{k} {v}" for k, v in cg["events"].items())))
        psi = mem.get("pressure")
        if psi is not None:
            out.append(("pressure avg10", f"some {psi['some_avg10']:.2f}%, full {psi['full_avg10']:.2f}%"))
        gc = mem["gc"]
        last = "never" if gc["last_at"] is None else f"freed {mib(gc['last_freed_bytes'])} last time"
        out.append(("forced GC", f"{gc['runs']} runs, {last}"))
    for key in ("sessions", "tasks"):
        v = doc.get(key)
        out.append((key, "-" if v is None else f"{v['current']} of {v['max']}"))
    smtp = doc.get("smtp", {})
    conns = smtp.get("connections", {})
    rejected = conns.get("rejected", {})
    out += [
        ("connections", f"{conns.get('accepted', 0)} accepted, {sum(rejected.values())} rejected"
                        + (f" ({', '.join(f'{k} {v}' for k, v in rejected.items())})"
                           if rejected else "")),
        ("messages", f"{smtp.get('messages_accepted', 0)} accepted, "
                     f"{smtp.get('recipients_accepted', 0)} recipients, "
                     f"{mib(smtp.get('bytes_accepted', 0))}"),
    ]
    replies = smtp.get("replies", {})
    if replies:
        out.append(("replies", ", ".join(f"{k}: {v}" for k, v in replies.items())))
    q = doc.get("queue")
    if q:
        oldest = q.get("oldest_age_seconds")
        out.append(("queue", ", ".join(f"{n} {state}" for state, n in q["messages"].items())
                    + f"; {mib(q['bytes'])}; oldest "
                    + ("-" if oldest is None else _duration(oldest))))
        c = q["concurrency"]
        out.append(("deliveries", f"{c['running']} running of {c['limit']} allowed"
                    + ("; stuck: " + "; ".join(q["stuck"]) if q["stuck"] else "")))
    loop = doc.get("event_loop", {})
    out.append(("event loop", f"heartbeat {loop.get('heartbeat_age_seconds', 0):.1f}s ago"))
    return out


def render(doc: dict[str, Any]) -> str:
    table = rows(doc)
    width = max(len(k) for k, _ in table)
    return "".join(f"{k:<{width}}  {v}\n" for k, v in table)


def rates(prev: dict[str, Any], doc: dict[str, Any], seconds: float) -> tuple[str, str]:
    """("rate", "12.0 msg/s, 3.0 conn/s, 0.5 452/s") between two documents `seconds` apart."""
    def smtp(d: dict[str, Any]) -> tuple[int, int, int]:
        s = d.get("smtp", {})
        replies = s.get("replies", {})
        return (int(s.get("messages_accepted", 0)),
                int(s.get("connections", {}).get("accepted", 0)),
                sum(int(n) for k, n in replies.items() if k.startswith("452")))

    before, now = smtp(prev), smtp(doc)
    per = max(seconds, 1e-9)
    m, c, r = ((b - a) / per for a, b in zip(before, now, strict=True))
    return ("rate", f"{m:.1f} msg/s, {c:.1f} conn/s, {r:.1f} 452/s")


# Cursor home and clear to the end of the screen: each frame replaces the last, like watch(1).
CLEAR = "\x1b[H\x1b[J"


def frame(doc: dict[str, Any] | None, error: str | None, header: str,
          rate: tuple[str, str] | None) -> str:
    """One screen of `elemta stats --watch`: a header, then the table (or why there is none)."""
    if doc is None:
        return f"{header}\n\n{error}\n"
    table = rows(doc)
    if rate is not None:
        table.insert(2, rate)
    width = max(len(k) for k, _ in table)
    return f"{header}\n\n" + "".join(f"{k:<{width}}  {v}\n" for k, v in table)
