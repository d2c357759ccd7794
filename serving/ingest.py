"""Events over HTTP, judged by the rating dataflow's own validator, produced to the input
topic keyed by tenant, answered only after the broker acknowledged them (acks=all).

A batch is split into its events first, so one bad event costs only itself: the answer
lists, by position, which events were accepted (and are on the topic) and which were
refused and why. The validator is the same code the rating dataflow runs, so an event the
API accepts is one rating will accept (barring a catalog change in between). Structure
nested beyond the limit is cut out and refused here, without recursion, before anything
recursive (the batch decoder, the validator) reads it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from confluent_kafka import KafkaError, KafkaException

from operators.catalog_index import CatalogIndex
from operators.deadletters import clip
from operators.jsonscan import array_elements, nesting_depth
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


class _Subject(msgspec.Struct):
    subject: str | None = None


_ONE_SUBJECT = msgspec.json.Decoder(_Subject)
_SUBJECT = msgspec.json.Decoder(_Subject | list[msgspec.Raw])


def _subject(raw: msgspec.Raw) -> str | None:
    try:
        return _ONE_SUBJECT.decode(raw).subject
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None


class _Msg:
    """What the validator reads of a message: one event of the request, at its position."""

    __slots__ = ("_o", "_v")

    def __init__(self, value: bytes, offset: int) -> None:
        self._v, self._o = value, offset

    def value(self) -> bytes:
        return self._v

    def offset(self) -> int:
        return self._o

    def headers(self) -> None:
        return None  # binary mode over HTTP is turned into structured JSON before (serving/app.py)

    def timestamp(self) -> tuple[int, int]:
        return (0, 0)


@dataclass
class Judged:
    accepted: list[Accepted] = field(default_factory=list)
    refused: dict[int, tuple[str, str]] = field(default_factory=dict)  # position -> (reason, message)


class BrokerDown(Exception):
    """The broker did not acknowledge in time: nothing can be promised (503)."""


class NotServed(Exception):
    """403: the event at `index` is for a tenant the token does not serve; nothing produced."""

    def __init__(self, index: int, tenant: str) -> None:
        super().__init__(f"this token does not serve tenant '{clip(tenant)}' (the event at index {index}); nothing was sent")
        self.index = index


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
        self._closing = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="delivery-reports", daemon=True)
        self._poller.start()

    @staticmethod
    def split(body: bytes, batch: bool) -> list[bytes] | Judged:
        """The body's events (one C-speed pass, so a client's rate is checked before any is
        validated); a body that is not even an array of JSON values is one refusal. An
        element nested deeper than the decoder recurses is cut out by structure instead (no
        recursion), for `judge` to refuse it alone."""
        if not batch:
            return [body]
        try:
            return [bytes(r) for r in _EVENTS.decode(body)]
        except msgspec.DecodeError as e:
            return Judged(refused={0: ("invalid_json", f"a batch must be a JSON array of CloudEvents: {e}")})
        except RecursionError:
            parts = array_elements(body)
            if parts is None:
                return Judged(refused={0: ("invalid_json", "a batch must be a JSON array of CloudEvents; this one is unreadable")})
            return parts

    def judge(self, parts: list[bytes], serves: Callable[[str], bool] | None = None) -> Judged:
        """Each event by the rating dataflow's validator, by position. An event nested beyond
        the limit is refused here, unread. With `serves` (a token bound to some tenants), an
        event for any other tenant raises `NotServed` before anything is produced: read from
        the envelope before validation (so refusals tell nothing about other tenants) and
        checked again on what the validator accepted (however the event was shaped)."""
        out = Judged(refused=self._too_deep(parts))
        if serves is not None:
            for i, tenant in self._subjects(parts, out.refused):
                if not serves(tenant):
                    raise NotServed(i, tenant)
        dead: list[DeadLetter] = []
        now = int(time.time() * 1000)
        msgs = [_Msg(p, i) for i, p in enumerate(parts) if i not in out.refused]
        with self.lock:
            self.watch.poll()
            self.validator.parse_batch(msgs, "http", 0, iso(now), out.accepted, dead, now)
        for d in dead:
            out.refused[d.offset] = (d.reason, d.message)
        if serves is not None:
            for a in sorted(out.accepted, key=lambda a: a.offset):
                if not serves(a.tenant_id):
                    raise NotServed(a.offset, a.tenant_id)
        return out

    def _too_deep(self, parts: list[bytes]) -> dict[int, tuple[str, str]]:
        """The events nested beyond `max_depth`, by position. Counting brackets is C-speed and
        bounds the depth from above, so only a suspect event is scanned."""
        limit = self.s.limits.max_depth
        out: dict[int, tuple[str, str]] = {}
        for i, p in enumerate(parts):
            if p.count(b"[") + p.count(b"{") > limit and (depth := nesting_depth(p)) > limit:
                out[i] = ("too_deep", f"arrays and objects nested {depth} deep; the limit is {limit} (TALLYFLOW_MAX_DEPTH)")
        return out

    @staticmethod
    def _subjects(parts: list[bytes], skip: dict[int, tuple[str, str]]) -> Iterator[tuple[int, str]]:
        """(position, subject) of every event naming one, an array posted at one position
        (which the validator reads as a batch) included; an event naming none is left for
        the validator to refuse."""
        for i, p in enumerate(parts):
            if i in skip:
                continue
            try:
                one = _SUBJECT.decode(p)
            except (msgspec.DecodeError, UnicodeDecodeError):
                continue
            for subject in [one.subject] if isinstance(one, _Subject) else map(_subject, one):
                if subject is not None:
                    yield i, subject

    async def produce(self, accepted: list[Accepted]) -> None:
        """Hand the events to the broker and wait for their acknowledgements, and only theirs:
        concurrent requests do not wait for each other (a flush would wait for every message
        in flight). Delivery reports are served by the poller thread."""
        topic = self.s.topics.input
        await self.send([(topic, a.tenant_id.encode(), a.payload) for a in accepted])

    async def send(self, records: list[tuple[str, bytes, bytes]]) -> None:
        """(topic, key, value) records to the broker, acknowledged (as `produce`)."""
        if not records:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        left = [len(records)]
        errors: list[KafkaError] = []

        def settle() -> None:
            if not done.done():
                done.set_result(None)

        def report(err: KafkaError | None, _msg: Any) -> None:  # in the poller thread
            if err is not None:
                errors.append(err)
            left[0] -= 1
            if left[0] == 0:
                loop.call_soon_threadsafe(settle)

        timeout = self.s.api.produce_timeout_seconds
        deadline = loop.time() + timeout
        for topic, key, value in records:
            while True:
                try:
                    self.producer.produce(topic, value, key, on_delivery=report)
                    break
                except BufferError:  # the local queue is full: the broker is slow or away
                    if loop.time() > deadline:
                        raise BrokerDown("the producer's queue stayed full") from None
                    await asyncio.sleep(0.005)  # back-off while the poller drains the queue, not a synchronisation
        try:
            await asyncio.wait_for(done, timeout + 1)
        except TimeoutError:
            raise BrokerDown(f"{left[0]} event(s) not acknowledged in time") from None
        if errors:
            raise BrokerDown(str(errors[0]))

    def _poll(self) -> None:
        while not self._closing.is_set():
            self.producer.poll(0.05)

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
        self._closing.set()
        self._poller.join(5)
        self.producer.flush(5)
