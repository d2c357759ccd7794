"""The HTTP side every web destination shares: one client per destination, and the
translation of a response into an `Answer` (2xx and 409 accepted, 4xx rejected for good,
5xx / 408 / 425 / 429 / timeouts tried again later, honouring Retry-After).

`transport` is injectable: tests pass `httpx.MockTransport` where a real server adds
nothing, and the integration tests use the real sandbox on loopback.
"""

from __future__ import annotations

import httpx

from operators.delivery import classify
from sinks.base import Answer


class HttpClient:
    def __init__(self, base_url: str, timeout_s: float, *, token: str = "", transport: httpx.BaseTransport | None = None) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=timeout_s, transport=transport)
        self.token = token

    def post(self, path: str, body: bytes, headers: dict[str, str], n_items: int) -> Answer:
        """POST a JSON body; the answer covers all `n_items` of the request alike."""
        hdrs = {"Content-Type": "application/json", **headers}
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        try:
            r = self.client.post(path, content=body, headers=hdrs)
        except httpx.TransportError as e:  # timeouts and connection errors: nothing decided
            return Answer.later(type(e).__name__, str(e)[:500])
        verdict, wait = classify(r.status_code, dict(r.headers))
        if verdict == "retry":
            return Answer.later(r.status_code, r.text[:2000], wait)
        if verdict == "reject":
            return Answer.all_rejected(n_items, f"{r.status_code}: {r.text[:2000]}", r.status_code)
        return Answer(status=r.status_code)

    def close(self) -> None:
        self.client.close()
