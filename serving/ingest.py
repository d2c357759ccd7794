"""Events over HTTP, judged by the rating dataflow's own validator, produced to the input
topic keyed by tenant, answered only after the broker acknowledged them (acks=all).

A batch is split into its events first, so one bad event costs only itself: the answer
lists, by position, which events were accepted (and are on the topic) and which were
refused and why. The validator is the same code the rating dataflow runs, so an event the
API accepts is one rating will accept (barring a catalog change in between).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from confluent_kafka import KafkaError, KafkaException

from operators.catalog_index import CatalogIndex
from operators.periods import iso
from operators.stats import Stats
from operators.validate import Validator
from runtime import kafka
from runtime.catalog_watch import CatalogWatch
from runtime.settings import Settings
from schemas.catalog import load_catalog
from schemas.outputs import DeadLetter
from schemas.records import Accepted

_EVENTS = msgspec.json.Decoder(list[msgspec.Raw])


class _Msg:
    """What the validator reads of a message: one event of the request, at its position."""

    __slots__ = ("_o", "_v")

    def __init__(self, value: bytes, offset: int) -> None:
        self._v, self._o = value, offset

    def value(self) -> bytes:
        return self._v

    def offset(self) -> int:
        return self._o

    def timestamp(self) -> tuple[int, int]:
        return (0, 0)


@dataclass
class Judged:
    accepted: list[Accepted] = field(default_factory=list)
    refused: dict[int, tuple[str, str]] = field(default_factory=dict)  # position -> (reason, message)


class BrokerDown(Exception):
    """The broker did not acknowledge in time: nothing can be promised (503)."""


def catalog_watch(s: Settings, stats: Stats) -> CatalogWatch:
    return CatalogWatch(s.process.catalog, CatalogIndex.build(load_catalog(s.process.catalog)), s.process.catalog_reload_seconds, stats)


class Ingest:
    def __init__(self, s: Settings, watch: CatalogWatch | None = None) -> None:
        self.s = s
        self.stats = Stats()
        # The same live reloads as the rating dataflow: a tenant onboarded in the catalog is
        # accepted here as soon as rating accepts it, without a restart.
        self.watch = watch or catalog_watch(s, self.stats)
        self.validator = Validator(self.watch.index, self.stats, s.limits)
        self.watch.listeners.append(lambda idx: setattr(self, "validator", Validator(idx, self.stats, s.limits)))
        self.lock = threading.Lock()  # the validator keeps per-call state
        self._checked_at: float = -1e9
        self._problem: str | None = None
        self.producer = kafka.producer(
            s.kafka.config(
                **{
                    "acks": "all",
                    "enable.idempotence": True,
                    "linger.ms": 2,
                    "message.timeout.ms": int(s.api.produce_timeout_seconds * 1000),
                }
            )
        )

    def judge(self, body: bytes, batch: bool) -> Judged:
        """Split and validate; a body that is not even an array of JSON values is one refusal."""
        if batch:
            try:
                parts = [bytes(r) for r in _EVENTS.decode(body)]
            except msgspec.DecodeError as e:
                return Judged(refused={0: ("invalid_json", f"a batch must be a JSON array of CloudEvents: {e}")})
        else:
            parts = [body]
        out = Judged()
        dead: list[DeadLetter] = []
        now = int(time.time() * 1000)
        with self.lock:
            self.watch.poll()
            self.validator.parse_batch([_Msg(p, i) for i, p in enumerate(parts)], "http", 0, iso(now), out.accepted, dead, now)
        for d in dead:
            out.refused[d.offset] = (d.reason, d.message)
        return out

    def produce(self, accepted: list[Accepted]) -> None:
        """Hand the events to the broker and wait for every acknowledgement."""
        errors: list[KafkaError] = []

        def report(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                errors.append(err)

        topic = self.s.topics.input
        for a in accepted:
            self.producer.produce(topic, a.payload, a.tenant_id.encode(), on_delivery=report)
        left = self.producer.flush(self.s.api.produce_timeout_seconds + 1)
        if left or errors:
            raise BrokerDown(str(errors[0]) if errors else f"{left} event(s) not acknowledged in time")

    def broker_problem(self) -> str | None:
        """Why the broker cannot take events now (for /readyz), asked at most every 5 s."""
        now = time.monotonic()
        if now - self._checked_at > 5.0:
            try:
                self.producer.list_topics(self.s.topics.input, timeout=2.0)
                self._problem = None
            except KafkaException as e:
                self._problem = f"the Kafka brokers at {self.s.kafka.brokers} do not answer ({e})"
            self._checked_at = now
        return self._problem

    def close(self) -> None:
        self.producer.flush(5)
