"""Turn raw Kafka message bytes into accepted usage or dead letters with a reason.

Any byte string yields dead letters or accepted events, never an exception (SPEC §3.7):
every bound of `InputLimits` is checked here, before an event can change state, and a bad
element inside a JSON array is dead-lettered alone, so its neighbours still count.

The fast path decodes a well-formed single event with one typed msgspec call and no
try/except of its own: whatever fails on it (a decode error, or a bug of ours) is caught
once per batch, and that one message is judged again on the slow path, which classifies
it, or dead-letters it as `internal_error`; the batch then continues after it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Any

import msgspec
from xxhash import xxh3_64_intdigest

from operators.catalog_index import CatalogIndex
from operators.deadletters import clip, dead_letter, internal_error
from operators.jsonscan import array_elements, nesting_depth
from operators.stats import Stats
from schemas.events import EventDecoder, Identity, InputLimits, quantity_type, unique_type
from schemas.outputs import DeadLetter, DeadLetterReason
from schemas.records import Accepted


class _Reject(Exception):
    """A judgement on one event; caught once in `_one`, where the dead letter is written."""

    def __init__(self, reason: DeadLetterReason, message: str) -> None:
        self.reason, self.message = reason, message


# (meter slug, reads the quantity from the event or None for COUNT, is a quantity)
Reader = tuple[str, Callable[[Any], Any] | None, bool]


def _classify(e: msgspec.ValidationError) -> DeadLetterReason:
    msg = str(e)
    if "Invalid value" in msg and msg.endswith(".type`"):
        return "unknown_meter"
    if ".data" in msg or "field `data`" in msg:
        return "bad_quantity"
    return "schema"


def _ms(ts: float) -> int:
    # Exact floor to the millisecond for µs-precision times: the float's error after the
    # multiplication stays below 0.0005 ms until 2100, and the fraction is a multiple of 0.001.
    return int(ts * 1000 + 0.0005)


class Validator:
    """Stateless per message: decode, check bounds and schema, resolve tenant, plan, meters."""

    def __init__(self, catalog: CatalogIndex, stats: Stats, limits: InputLimits | None = None) -> None:
        self.cat = catalog
        self.stats = stats
        self.lim = lim = limits or InputLimits()
        fields: dict[str, list[tuple[str, Any]]] = {}
        readers: dict[str, list[Reader]] = {}
        qty, uniq = quantity_type(lim), unique_type(lim)
        for etype, specs in catalog.meters_by_type.items():
            fields[etype], readers[etype] = [], []
            for spec in specs:
                m = spec.meter
                if m.aggregation == "COUNT":
                    readers[etype].append((m.slug, None, True))
                    continue
                path, typ = (m.unique_path, uniq) if m.aggregation == "UNIQUE_COUNT" else (m.value_path, qty)
                assert path is not None
                fields[etype].append((path, typ))
                readers[etype].append((m.slug, operator.attrgetter(f"data.{path}"), typ is qty))
        self.decoder = EventDecoder(fields, lim)
        self.readers = {cls: readers[etype] for cls, etype in self.decoder.classes.items()}
        self._tenants = catalog.tenants
        # Per pricing version and event class: the readers of the meters that plan prices.
        self._plan_readers: dict[str, dict[type, list[Reader]]] = {
            pv: {cls: [r for r in rs if r[0] in plan.meters] for cls, rs in self.readers.items()}
            for pv, plan in catalog.plans_by_version.items()
        }
        self._min_ms = _ms(lim.min_event_time.timestamp())
        self._skew_ms = int(lim.max_future_seconds * 1000)
        self._max_q = lim.max_quantity
        self._min_exp = -lim.max_quantity_decimals
        # The batch being judged (set by parse_batch; saves passing them to every call).
        self._topic, self._partition, self._received = "", 0, ""
        self._accepted: list[Accepted] = []
        self._dead: list[DeadLetter] = []
        self._max_ms = 0

    # -- batches ------------------------------------------------------------------------
    def parse_batch(
        self,
        messages: Iterable[Any],
        topic: str,
        partition: int,
        received_at: str,
        accepted: list[Accepted],
        dead: list[DeadLetter],
        now_ms: int,
    ) -> None:
        """Judge the messages of one topic partition (objects with `value()`, `offset()` and
        `timestamp()`, as confluent-kafka's); append outcomes in order. An event may be at
        most `max_future_seconds` ahead of its message's Kafka timestamp, or of `now_ms` when
        that is earlier or unknown: a replay of the same message is judged as the first
        reading was.

        The nesting bound is checked wherever Tallyflow parses structure it does not know
        (arrays, messages the typed decoder refuses); inside an event the typed decoder
        reads, what it does not read is skipped without being built, at any depth its own
        recursion limit allows (deeper: `too_deep`)."""
        self._topic, self._partition, self._received = topic, partition, received_at
        self._accepted, self._dead = accepted, dead
        decode = self.decoder.single_or_batch.decode
        one = self._one
        max_bytes, skew = self.lim.max_message_bytes, self._skew_ms
        n0 = len(accepted)
        it = iter(messages)
        value: bytes | None = None
        offset = 0
        while True:
            try:
                for m in it:
                    value, offset = m.value(), m.offset()
                    ts = m.timestamp()[1]
                    self._max_ms = (ts if 0 < ts < now_ms else now_ms) + skew
                    if value is None or len(value) > max_bytes:
                        self._slow(value, offset)
                        continue
                    decoded = decode(value)
                    if type(decoded) is list:
                        self._slow(value, offset)
                    else:
                        one(decoded, value, offset, None)
                break
            except Exception:  # this message alone goes the slow way; the batch goes on after it
                self._guarded(value, offset)
        self.stats.records_in += len(accepted) - n0  # dead letters count themselves in _reject

    def _guarded(self, value: bytes | None, offset: int) -> None:
        """The slow path for one message, with a failure of ours dead-lettering it alone."""
        n_acc, n_dead = len(self._accepted), len(self._dead)
        try:
            self._slow(value, offset)
        except Exception as e:
            del self._accepted[n_acc:]  # nothing half-judged stays
            for d in self._dead[n_dead:]:
                self._uncount(d)
            del self._dead[n_dead:]
            why = internal_error(e, "validating an event", topic=self._topic, partition=self._partition, offset=offset)
            self._reject("internal_error", why, value or b"", offset)

    # -- the slow path ------------------------------------------------------------------
    def _slow(self, value: bytes | None, offset: int) -> None:
        """Everything the fast path leaves: limits, arrays, and messages that failed to decode."""
        payload = value or b""
        if not payload:
            return self._reject("invalid_json", "empty message (a tombstone?)", payload, offset)
        lim = self.lim
        if len(payload) > lim.max_message_bytes:
            return self._reject(
                "too_large",
                f"message of {len(payload):,} bytes is over the limit of {lim.max_message_bytes:,} (TALLYFLOW_MAX_MESSAGE_BYTES)",
                payload,
                offset,
            )
        depth = nesting_depth(payload)
        if depth > lim.max_depth:
            if payload.lstrip()[:1] == b"[":
                return self._elements(payload, offset)  # the bound is per event: each element is held to it alone
            return self._too_deep(depth, payload, offset)
        try:
            decoded = self.decoder.single_or_batch.decode(payload)
        except msgspec.ValidationError as e:
            if payload.lstrip()[:1] == b"[":
                return self._elements(payload, offset)
            return self._reject(_classify(e), str(e), payload, offset, None, self._identity(payload))
        except (msgspec.DecodeError, UnicodeDecodeError) as e:
            if payload.lstrip()[:1] == b"[":
                return self._elements(payload, offset)
            return self._reject("invalid_json", _not_json(e), payload, offset)
        except RecursionError:
            return self._reject("too_deep", "nested deeper than the decoder can follow", payload, offset)
        if isinstance(decoded, list):
            if not decoded:
                return self._reject("schema", "an empty JSON array holds no events", payload, offset)
            for i, ev in enumerate(decoded):
                # Elements share the message as payload; `index` says which one a dead letter is.
                self._element(ev, payload, offset, i)
        else:
            self._one(decoded, payload, offset, None)

    def _elements(self, payload: bytes, offset: int) -> None:
        """An array with a bad element: judge each element on its own."""
        why = ""
        try:
            elements: list[bytes] | None = [bytes(r) for r in self.decoder.raw_array.decode(payload)]
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
            why = _not_json(e)
            elements = array_elements(payload)  # an element with bad UTF-8 or escapes: cut out by structure
        if elements is None:
            return self._reject("invalid_json", f"{why or 'not JSON'}; not a readable JSON array", payload, offset)
        if not elements:
            return self._reject("schema", "an empty JSON array holds no events", payload, offset)
        one = self.decoder.one.decode
        max_depth = self.lim.max_depth
        for i, raw in enumerate(elements):
            depth = nesting_depth(raw)
            if depth > max_depth:
                self._too_deep(depth, raw, offset, i)
                continue
            try:
                ev = one(raw)
            except msgspec.ValidationError as e:
                self._reject(_classify(e), str(e), raw, offset, i, self._identity(raw))
                continue
            except (msgspec.DecodeError, UnicodeDecodeError) as e:
                self._reject("invalid_json", _not_json(e), raw, offset, i)
                continue
            self._element(ev, raw, offset, i)

    def _too_deep(self, depth: int, raw: bytes, offset: int, index: int | None = None) -> None:
        why = f"arrays and objects nested {depth} deep; the limit is {self.lim.max_depth} (TALLYFLOW_MAX_DEPTH)"
        self._reject("too_deep", why, raw, offset, index, self._identity(raw))  # who it was, if readable

    def _element(self, ev: Any, raw: bytes, offset: int, index: int) -> None:
        """One element of an array; a failure of ours on it spares its neighbours."""
        try:
            self._one(ev, raw, offset, index)
        except Exception as e:
            why = internal_error(e, "validating an event", topic=self._topic, partition=self._partition, offset=offset, index=index)
            self._reject("internal_error", why, raw, offset, index, ev)

    def _identity(self, raw: bytes) -> Identity:
        """Tenant and event id of an event that failed validation, when its envelope says."""
        try:
            return self.decoder.identity.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return Identity()

    def _reject(self, reason: DeadLetterReason, message: str, raw: bytes, offset: int, index: int | None = None, who: Any = None) -> None:
        self.stats.records_in += 1
        self.stats.dead[reason] += 1
        subject, event_id = (getattr(who, "subject", None), getattr(who, "id", None)) if who is not None else (None, None)
        self._dead.append(
            dead_letter(
                reason,
                message,
                raw,
                self._topic,
                self._partition,
                offset,
                self._received,
                index,
                event_id if isinstance(event_id, str) else None,
                subject if isinstance(subject, str) else None,
            )
        )

    def _uncount(self, d: DeadLetter) -> None:
        self.stats.records_in -= 1
        self.stats.dead[d.reason] -= 1

    # -- one event ----------------------------------------------------------------------
    def _one(self, ev: Any, raw: bytes, offset: int, index: int | None) -> None:
        try:
            tenant = self._tenants.get(ev.subject)
            if tenant is None:
                raise _Reject("unknown_tenant", f"tenant '{clip(ev.subject)}' is not in the catalog")
            ts_ms = _ms(ev.time.timestamp())
            if ts_ms < self._min_ms:
                raise _Reject(
                    "bad_time", f"event time {ev.time.isoformat()} is before {self.lim.min_event_time.date()}, the earliest accepted"
                )
            if ts_ms > self._max_ms:
                raise _Reject(
                    "future_time",
                    f"event time {ev.time.isoformat()} is more than {self.lim.max_future_seconds:g}s ahead of the clock "
                    "(TALLYFLOW_MAX_FUTURE_SECONDS); fix the producer's clock, then re-drive it",
                )
            plan = tenant.only_plan or tenant.plan_at(ts_ms)
            if plan is None or (tenant.until_ms is not None and ts_ms >= tenant.until_ms):
                raise _Reject("unknown_tenant", f"tenant '{ev.subject}' has no contract in force at {ev.time.isoformat()}")
            readers = self._plan_readers[plan.pricing_version][type(ev)]
            if not readers:
                raise _Reject("unknown_meter", f"plan '{plan.pricing_version}' prices no meter of type '{self.decoder.classes[type(ev)]}'")
            values: list[tuple[str, Any]] = []
            for slug, read, is_qty in readers:
                if read is None:
                    values.append((slug, 1))
                    continue
                v = read(ev)
                if is_qty and type(v) is Decimal:
                    self._check_decimal(slug, v)
                values.append((slug, v))
        except _Reject as r:
            return self._reject(r.reason, r.message, raw, offset, index, ev)
        subject = ev.subject
        pos = (offset * 1_000_003 + self._partition * 65_537 + (0xFFFF if index is None else index)) & 0xFFFFFFFF  # dedup.position
        self._accepted.append(
            Accepted(
                subject,
                plan.pricing_version,
                xxh3_64_intdigest(f"{subject}\x1f{ev.source}\x1f{ev.id}".encode()),  # dedup.event_hash
                (pos << 32) | (ts_ms // 3_600_000),  # dedup.meta
                ev.id,
                ts_ms,
                values,
                raw,
                self._topic,
                self._partition,
                offset,
                index,
            )
        )

    def _check_decimal(self, slug: str, v: Decimal) -> None:
        """Decimal quantities: finite, non-negative, within the limits of exact rating."""
        if not v.is_finite() or v < 0:
            raise _Reject("bad_quantity", f"meter '{slug}' needs a finite non-negative quantity, got {clip(str(v))}")
        if v > self._max_q:
            raise _Reject("bad_quantity", f"meter '{slug}': {clip(str(v))} is over the limit of {self._max_q} (TALLYFLOW_MAX_QUANTITY)")
        exp = v.normalize().as_tuple().exponent
        if isinstance(exp, int) and exp < self._min_exp:
            raise _Reject(
                "bad_quantity",
                f"meter '{slug}': {clip(str(v))} has more than {-self._min_exp} decimal places (TALLYFLOW_MAX_QUANTITY_DECIMALS)",
            )


def _not_json(e: Exception) -> str:
    return f"not UTF-8: {e}" if isinstance(e, UnicodeDecodeError) else f"not JSON: {e}"
