"""`tallyflow sandbox`: local CRM, customer-success and ERP endpoints that record what they
accept, enforce idempotency keys and signatures, and inject faults on demand.

    POST /crm/accounts/{account}/signals     one alert, Idempotency-Key required
    POST /success/webhook                    one alert, signed per Standard Webhooks (webhook-id/-timestamp/-signature)
    POST /erp/usage-batches                  {"batch_id", "lines": [...]}, Idempotency-Key required
    POST /erp/credit-batches                 {"batch_id", "credits": [...]}, Idempotency-Key required
    GET  /api/state                          counts, duplicates, totals per tenant, faults
    GET  /api/items/{crm|success|erp|erp-credits}      everything accepted, with receipt times
    GET  /api/requests/{crm|success|erp|erp-credits}   every request: time and status
    POST /api/faults                         {"target": "erp", "mode": "down|error|throttle|latency|timeout|reject",
                                              "count": N (default: until cleared), "retry_after": s, "latency_ms": ms}
                                             (target "erp" is the whole ERP, both paths; "erp-credits" the credit path only)
    DELETE /api/faults                       clear all faults
    GET  /                                   an HTML page of the above, for people
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import islice
from typing import Any

from operators.status import secret_bytes

TARGETS = ("crm", "success", "erp", "erp-credits", "crm-status")
PATHS = {"/success/webhook": "success", "/erp/usage-batches": "erp", "/erp/credit-batches": "erp-credits"}
ITEMS = {
    "erp": ("lines", "line_id"),
    "erp-credits": ("credits", "record_id"),
    "crm-status": ("", "status_id"),
}  # a batch's list and its items' id


@dataclass
class Fault:
    mode: str
    count: int | None = None  # None: until cleared
    retry_after: float = 1.0
    latency_ms: float = 0.0


@dataclass
class Endpoint:
    """What one endpoint received. Counts and totals are kept as requests arrive, so `GET
    /api/state` costs the same with 100 or 100,000 items (polled while a backlog drains, it
    must not take the lock the requests need for long)."""

    accepted: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> item (+ received_at)
    duplicates: list[str] = field(default_factory=list)  # ids that arrived again under a new key
    responses: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # idempotency key -> response
    requests: list[tuple[float, int]] = field(default_factory=list)  # (time, status)
    by_status: dict[str, int] = field(default_factory=dict)  # status -> requests
    # ERP: tenant -> currency -> amount accepted (lines: gross; credit records: drawn less returned)
    totals: dict[str, dict[str, Decimal]] = field(default_factory=dict)
    replays: int = 0
    inflight: int = 0  # requests being handled right now
    peak_inflight: int = 0  # the most handled at once

    def answered(self, status: int) -> None:
        self.requests.append((time.time(), status))
        self.by_status[str(status)] = self.by_status.get(str(status), 0) + 1


WEBHOOK_TOLERANCE_S = 300  # Standard Webhooks: refuse timestamps further off (replays)


def _check_webhook(key: bytes, msg_id: str | None, timestamp: str | None, signatures: str | None, body: bytes) -> str:
    """Verify as a Standard Webhooks receiver does, apart from the sender's code so a
    signing mistake shows here; returns why it is refused, or "".

    The key may be raw bytes or a `whsec_<base64>` secret as configured."""
    if not (msg_id and timestamp and signatures):
        given = {"webhook-id": msg_id, "webhook-timestamp": timestamp, "webhook-signature": signatures}
        return "missing " + ", ".join(h for h, v in given.items() if not v)
    if not (timestamp.isascii() and timestamp.isdigit()) or abs(time.time() - int(timestamp)) > WEBHOOK_TOLERANCE_S:
        return "timestamp outside tolerance"
    secret = secret_bytes(key.decode()) if key.startswith(b"whsec_") else key
    mac = hmac.new(secret, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    want = b"v1," + base64.b64encode(mac)
    if not any(hmac.compare_digest(want, s.encode("latin-1")) for s in signatures.split(" ")):
        return "bad signature"
    return ""


class SandboxState:
    """Each endpoint checks its own credential, as the real systems would: the CRM and the
    ERP their bearer token, the success webhook its signature; the fault API its own token."""

    def __init__(self, hmac_key: bytes = b"", crm_token: str = "", erp_token: str = "", admin_token: str = "") -> None:
        self.lock = threading.Lock()
        self.endpoints = {t: Endpoint() for t in TARGETS}
        self.faults: dict[str, Fault] = {}
        self.hmac_key = hmac_key
        self.tokens = {"crm": crm_token, "erp": erp_token}
        self.admin_token = admin_token

    def fault_for(self, target: str) -> Fault | None:
        with self.lock:
            f = self.faults.get(target)
            if f is None:
                return None
            if f.count is not None:
                f.count -= 1
                if f.count <= 0:
                    del self.faults[target]
            return f

    def summary(self) -> dict[str, Any]:
        with self.lock:
            out: dict[str, Any] = {"faults": {k: vars(v) for k, v in self.faults.items()}}
            for name, ep in self.endpoints.items():
                d: dict[str, Any] = {
                    "accepted": len(ep.accepted),
                    "duplicates": len(ep.duplicates),
                    "replayed_keys": ep.replays,
                    "inflight": ep.inflight,
                    "peak_inflight": ep.peak_inflight,
                    "requests": len(ep.requests),
                    "by_status": dict(ep.by_status),
                    "last": list(islice(reversed(ep.accepted.values()), 5))[::-1],
                }
                if name == "erp":
                    d["totals_per_tenant"] = {t: {c: str(a) for c, a in by.items()} for t, by in ep.totals.items()}
                    d["lines_per_request"] = round(len(ep.accepted) / max(1, ep.by_status.get("200", 0)), 1)
                if name == "erp-credits":
                    d["applied_per_tenant"] = {t: {c: str(a) for c, a in by.items()} for t, by in ep.totals.items()}
                out[name] = d
            return out


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle on, every response would wait
    # for the client's delayed ACK (~40 ms).
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the state is the log
        return

    def _send(self, status: int, body: bytes, ctype: str = "application/json", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj, default=str).encode(), headers=headers)

    def do_GET(self) -> None:
        st = self.server.state
        if self.path == "/api/state":
            return self._json(200, st.summary())
        m = re.fullmatch(r"/api/(items|requests)/(crm|success|erp|erp-credits)", self.path)
        if m:
            with st.lock:
                ep = st.endpoints[m.group(2)]
                data = list(ep.accepted.values()) if m.group(1) == "items" else ep.requests
                return self._json(200, data)
        if self.path == "/":
            return self._send(200, _page(st.summary()).encode(), "text/html; charset=utf-8")
        self._json(404, {"error": "not found"})

    def _admin(self) -> bool:
        """Fault injection changes what the sandbox answers: only with its own token."""
        want = self.server.state.admin_token
        if want and not hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {want}"):
            self._json(401, {"error": "the fault API needs Authorization: Bearer <TALLYFLOW_SANDBOX_ADMIN_TOKEN>"})
            return False
        return True

    def do_DELETE(self) -> None:
        if self.path == "/api/faults":
            if not self._admin():
                return
            with self.server.state.lock:
                self.server.state.faults.clear()
            return self._json(200, {"faults": {}})
        self._json(404, {"error": "not found"})

    def do_POST(self) -> None:
        st = self.server.state
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/api/faults":
            if not self._admin():
                return
            spec = json.loads(body)
            target = spec.pop("target")
            with st.lock:
                st.faults[target] = Fault(**spec)
            return self._json(200, {"faults": {k: vars(v) for k, v in st.faults.items()}})
        account = self.path.startswith("/crm/accounts/")
        if account and self.path.endswith("/signals"):
            target = "crm"
        elif account and self.path.endswith("/billing-status"):
            target = "crm-status"  # an invoice's state on the account (SPEC §10.3)
        elif self.path in PATHS:
            target = PATHS[self.path]
        else:
            return self._json(404, {"error": "not found"})
        ep = st.endpoints[target]
        with st.lock:
            ep.inflight += 1
            ep.peak_inflight = max(ep.peak_inflight, ep.inflight)
        try:
            status, resp, hdrs = self._handle(target, body)
        finally:
            with st.lock:
                ep.inflight -= 1
        with st.lock:
            ep.answered(status)
        self._send(status, resp, headers=hdrs)

    def _handle(self, target: str, body: bytes) -> tuple[int, bytes, dict[str, str]]:
        st = self.server.state
        # The credit path is the same ERP: a fault on "erp" holds it too.
        fault = st.fault_for(target) or (st.fault_for("erp") if target == "erp-credits" else None)
        if fault is not None:
            if fault.mode == "down":
                return 503, b'{"error": "service unavailable"}', {}
            if fault.mode == "error":
                return 500, b'{"error": "internal error"}', {}
            if fault.mode == "throttle":
                return 429, b'{"error": "rate limited"}', {"Retry-After": f"{fault.retry_after:g}"}
            if fault.mode == "reject":
                return 422, b'{"error": "unprocessable: unknown customer"}', {}
            if fault.mode in ("latency", "timeout"):
                # A timeout is a slow answer the client gave up on; the work still happens,
                # which is exactly when idempotency keys matter.
                time.sleep(fault.latency_ms / 1000)
        token = st.tokens.get({"erp-credits": "erp", "crm-status": "crm"}.get(target, target), "")
        if token and not hmac.compare_digest(self.headers.get("Authorization", ""), f"Bearer {token}"):
            return 401, b'{"error": "bad token"}', {}
        if target == "success":
            refused = _check_webhook(
                st.hmac_key,
                self.headers.get("webhook-id"),
                self.headers.get("webhook-timestamp"),
                self.headers.get("webhook-signature"),
                body,
            )
            if refused:
                return 401, json.dumps({"error": refused}).encode(), {}
        # The success tool dedupes on webhook-id, as Standard Webhooks receivers do.
        key = self.headers.get("webhook-id") if target == "success" else self.headers.get("Idempotency-Key")
        if target != "success" and not key:
            return 400, b'{"error": "Idempotency-Key header required"}', {}
        try:
            doc = json.loads(body)
        except ValueError:
            return 400, b'{"error": "body is not JSON"}', {}
        now = time.time()
        with st.lock:
            ep = st.endpoints[target]
            if key and key in ep.responses:
                ep.replays += 1
                status, resp = ep.responses[key]
                return status, resp, {"Idempotent-Replayed": "true"}
            many, id_field = ITEMS.get(target, ("", "alert_id"))
            items = doc[many] if many else [doc]
            for it in items:
                iid = it[id_field]
                if iid in ep.accepted:
                    ep.duplicates.append(iid)
                else:
                    ep.accepted[iid] = {**it, "received_at": now}
                    if target == "erp" or it.get("kind") in ("drawn", "returned"):
                        by = ep.totals.setdefault(it["tenant_id"], {})
                        by[it["currency"]] = by.get(it["currency"], Decimal(0)) + _money(it)
            resp = json.dumps({"accepted": len(items)}).encode()
            if key:
                ep.responses[key] = (200, resp)
            return 200, resp, {}


def _money(item: dict[str, Any]) -> Decimal:
    """What an accepted line or drawn / returned record adds to its tenant's total: a line
    its gross amount; a record what it took off the invoice (returned gives back)."""
    amount = Decimal(item["amount"])
    return -amount if item.get("kind") == "returned" else amount


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver listens with a backlog of 5: a courier opening its window of connections
    # at once would overflow it, and a dropped SYN is retried after a whole second.
    request_queue_size = 128
    state: SandboxState

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away before its answer (a delivery process killed mid-request,
        which the tests do on purpose) is no error of the sandbox's; anything else is."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class Sandbox:
    """A sandbox on a loopback port: `with Sandbox() as sb: sb.url`."""

    def __init__(
        self,
        port: int = 0,
        hmac_key: bytes = b"",
        crm_token: str = "",
        erp_token: str = "",
        admin_token: str = "",
        host: str = "127.0.0.1",
    ) -> None:
        self.state = SandboxState(hmac_key, crm_token, erp_token, admin_token)
        self.server = _Server((host, port), _Handler)
        self.server.state = self.state
        self.thread = threading.Thread(target=self.server.serve_forever, name="sandbox", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> Sandbox:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fault(self, target: str, mode: str, **kw: Any) -> None:
        with self.state.lock:
            self.state.faults[target] = Fault(mode, **kw)

    def clear_faults(self) -> None:
        with self.state.lock:
            self.state.faults.clear()


# What the page shows of the last items each endpoint accepted.
_COLUMNS = {
    "crm": ("alert_id", "tenant_id", "crm_account_id", "meter", "period", "level", "usage", "limit"),
    "success": ("alert_id", "tenant_id", "meter", "period", "level", "usage", "limit"),
    "erp": ("line_id", "tenant_id", "erp_customer_id", "product_code", "quantity", "amount", "currency", "window_start", "revision"),
    "erp-credits": ("record_id", "kind", "tenant_id", "erp_customer_id", "grant_id", "amount", "currency", "period", "at"),
    "crm-status": ("status_id", "invoice_id", "state", "tenant_id", "crm_account_id", "amount", "currency", "at"),
}


def _table(head: tuple[str, ...] | list[str], rows: list[list[Any]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def _page(s: dict[str, Any]) -> str:
    """The sandbox for people: counts per endpoint, the last items as tables, ERP totals."""
    counts = []
    for name in TARGETS:
        d = s[name]
        responses = ", ".join(f"{k}: {v}" for k, v in sorted(d["by_status"].items()))
        inflight = f"{d['inflight']} (at most {d['peak_inflight']})"
        counts.append([name, d["accepted"], d["duplicates"], d["requests"], d["replayed_keys"], inflight, responses])
    parts = [_table(["endpoint", "accepted", "received twice", "requests", "replayed keys", "in flight", "responses"], counts)]
    for name in TARGETS:
        cols = _COLUMNS[name]
        last = [[x.get(c, "") for c in cols] for x in reversed(s[name]["last"])]
        parts.append(f"<h2>{name}: last accepted</h2>" + (_table(cols, last) if last else "<p>nothing yet</p>"))
    gross, applied = s["erp"]["totals_per_tenant"], s["erp-credits"]["applied_per_tenant"]
    tenants = sorted(set(gross) | set(applied))
    rows = []
    for t in tenants[:100]:
        for cur in sorted(set(gross.get(t, {})) | set(applied.get(t, {}))):
            g, c = Decimal(gross.get(t, {}).get(cur, "0")), Decimal(applied.get(t, {}).get(cur, "0"))
            rows.append([t, cur, g, c, g - c])
    parts.append(f"<h2>erp: amount per tenant ({len(tenants):,} tenants{', first 100' if len(tenants) > 100 else ''})</h2>")
    parts.append(_table(["tenant", "currency", "gross", "credits applied", "net"], rows))
    faults = [[t, f["mode"], "until cleared" if f["count"] is None else f["count"]] for t, f in s["faults"].items()]
    fault_html = _table(["endpoint", "fault", "requests left"], faults) if faults else "<p>none</p>"
    return (
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=2>"
        "<title>Tallyflow sandbox</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:.5em 0}"
        "td,th{padding:2px 10px;border-bottom:1px solid #ddd;text-align:left;font-size:.9em}th{background:#f4f4f4}</style></head><body>"
        f"<h1>Tallyflow sandbox</h1><h2>faults</h2>{fault_html}{''.join(parts)}</body></html>"
    )


class SandboxClient:
    """Drives a sandbox running in another process (`tallyflow sandbox`) over its API."""

    def __init__(self, url: str, admin_token: str = "") -> None:
        import httpx

        self.url = url
        headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
        self.http = httpx.Client(base_url=url, timeout=30, headers=headers)

    def fault(self, target: str, mode: str, **kw: Any) -> None:
        self.http.post("/api/faults", json={"target": target, "mode": mode, **kw}).raise_for_status()

    def clear_faults(self) -> None:
        self.http.delete("/api/faults").raise_for_status()

    def state(self) -> dict[str, Any]:
        return dict(self.http.get("/api/state").json())

    def items(self, target: str) -> dict[str, dict[str, Any]]:
        key = ITEMS.get(target, ("", "alert_id"))[1]
        return {it[key]: it for it in self.http.get(f"/api/items/{target}").json()}

    def requests(self, target: str) -> list[tuple[float, int]]:
        return [(t, s) for t, s in self.http.get(f"/api/requests/{target}").json()]
