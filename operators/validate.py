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
import orjson
from xxhash import xxh3_64_intdigest

from operators.catalog_index import CatalogIndex, PlanIndex, PlanMeterIndex, TenantIndex
from operators.deadletters import clip, dead_letter, internal_error
from operators.jsonscan import array_elements, nesting_depth
from operators.stats import Stats
from schemas.events import CREDIT_TYPES, EventDecoder, Identity, InputLimits, dimension_type, quantity_type, unique_type
from schemas.outputs import DeadLetter, DeadLetterReason
from schemas.records import Accepted


class Reject(Exception):
    """A judgement on one event: it becomes a dead letter with this reason and message."""

    def __init__(self, reason: DeadLetterReason, message: str) -> None:
        self.reason, self.message = reason, message


# (meter slug, reads the quantity from the event or None for COUNT, is a quantity, reads the
# dimension values or None)
Reader = tuple[str, Callable[[Any], Any] | None, bool, Callable[[Any], Any] | None]
# Under one pricing version: a reader, and the plan meter when it prices by cell (matrix).
PlanReader = tuple[str, Callable[[Any], Any] | None, bool, Callable[[Any], Any] | None, "PlanMeterIndex | None"]
# A meter value of an event: (meter slug, quantity or unique value, matrix cell or None).
Value = tuple[str, Any, "tuple[str, ...] | None"]
MAX_CELL_CACHE = 10_000  # priced cells remembered per plan meter (hostile dimension values cannot grow it)
# An event on its way to the engine that owns its tenant, as read (nothing built per event
# beyond this tuple): the decoded envelope, its bytes, its offset, the latest event time it
# may carry (ms: its message's Kafka timestamp or the clock, plus the allowed skew), and its
# position in a JSON array (None for a message of one event).
Item = tuple[Any, bytes, int, int, "int | None"]


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


def event_ms(ev: Any) -> int:
    """A decoded event's time as epoch milliseconds."""
    return _ms(ev.time.timestamp())


MAX_HEADERS = 32  # binary-mode headers kept on a dead letter (values cut to MAX_HEADER_CHARS)
MAX_HEADER_CHARS = 512
JSON_TYPES = ("application/json", "text/json")


class NotJsonData(ValueError):
    """A binary-mode CloudEvent whose data is not JSON (meters read JSON objects)."""


def binary_to_structured(
    headers: Iterable[tuple[str, bytes | str | None]], body: bytes | None, prefix: str = "ce_"
) -> tuple[bytes, dict[str, str]] | None:
    """A CloudEvent in binary content mode (attributes in `ce_*` headers, `content-type` the
    datacontenttype, the body its data; the Kafka and HTTP protocol bindings) as the
    structured JSON the decoder reads, with the headers it came with (bounded, for a dead
    letter); None when the headers name no CloudEvent (structured mode). Raises
    `UnicodeDecodeError` for a header that is not UTF-8 and `NotJsonData` for data that is
    not JSON, so both are judged like any event."""
    attrs: dict[str, str] = {}
    kept: dict[str, str] = {}
    ctype = None
    for name, raw in headers:
        key = name.lower()
        value = raw.decode() if isinstance(raw, bytes) else (raw or "")
        if key.startswith(prefix):
            attrs[key[len(prefix) :]] = value
        elif key == "content-type":
            ctype = value
        else:
            continue
        if len(kept) < MAX_HEADERS:
            kept[key] = clip(value, MAX_HEADER_CHARS)
    if "specversion" not in attrs:
        return None
    if ctype is not None:
        attrs["datacontenttype"] = ctype
        media = ctype.split(";")[0].strip().lower()
        if body and not (media in JSON_TYPES or media.endswith("+json")):
            raise NotJsonData(f"binary-mode data of content type '{clip(ctype)}': meters read JSON; send application/json")
    head = orjson.dumps(attrs)
    if not body:
        return head, kept
    return head[:-1] + b',"data":' + body + b"}", kept


class _Batch:
    """What judging one batch needs beside the messages: where they were read, and where
    outcomes go (`emit` takes a decoded event; dead letters are appended to `dead`), and the
    binary-mode headers and body of the message being judged (its dead letters keep them)."""

    __slots__ = ("body", "dead", "emit", "headers", "max_ms", "partition", "received", "topic")

    def __init__(
        self, topic: str, partition: int, received: str, dead: list[DeadLetter], emit: Callable[[Any, bytes, int, int | None], None]
    ) -> None:
        self.topic, self.partition, self.received, self.dead, self.emit = topic, partition, received, dead, emit
        self.max_ms = 0
        self.headers: dict[str, str] | None = None
        self.body: bytes = b""


class Validator:
    """Decodes messages and judges events against the catalog and the bounds. Holds only the
    catalog's tables: what one batch needs travels with the call, so a validator can be
    shared. `route` is the dataflow's intake (decode, then hand each event to its tenant's
    engine, which judges it in its one pass: `judge`); `parse_batch` judges at once, into
    `Accepted` records (the HTTP ingest, tools)."""

    def __init__(self, catalog: CatalogIndex, stats: Stats, limits: InputLimits | None = None) -> None:
        self.cat = catalog
        self.stats = stats
        self.lim = lim = limits or InputLimits()
        fields: dict[str, list[tuple[Any, ...]]] = {}
        readers: dict[str, list[Reader]] = {}
        qty, uniq, dim = quantity_type(lim), unique_type(lim), dimension_type()
        for etype, specs in catalog.meters_by_type.items():
            fields[etype], readers[etype] = [], []
            for spec in specs:
                m = spec.meter
                dims = list(m.dimensions)
                fields[etype] += [(d, dim, "") for d in dims if (d, dim, "") not in fields[etype]]  # a missing value is ""
                dims_get = _dims_getter(dims) if dims else None
                if m.aggregation == "COUNT":
                    readers[etype].append((m.slug, None, True, dims_get))
                    continue
                path, typ = (m.unique_path, uniq) if m.aggregation == "UNIQUE_COUNT" else (m.value_path, qty)
                assert path is not None
                fields[etype].append((path, typ))
                readers[etype].append((m.slug, operator.attrgetter(f"data.{path}"), typ is qty, dims_get))
        self.decoder = EventDecoder(fields, lim)
        self.readers = {cls: readers[etype] for cls, etype in self.decoder.classes.items()}
        self._tenants = catalog.tenants
        # Per pricing version and event class: the readers of the meters that plan prices,
        # with the plan meter when it prices by cell (the dimensions are read only then).
        self._plan_readers: dict[str, dict[type, list[PlanReader]]] = {
            pv: {
                cls: [
                    (slug, read, is_qty, dims_get, plan.meters[slug] if plan.meters[slug].matrix is not None else None)
                    for slug, read, is_qty, dims_get in rs
                    if slug in plan.meters
                ]
                for cls, rs in self.readers.items()
            }
            for pv, plan in catalog.plans_by_version.items()
        }
        self._min_ms = _ms(lim.min_event_time.timestamp())
        self._skew_ms = int(lim.max_future_seconds * 1000)
        self._max_q = lim.max_quantity
        self._min_exp = -lim.max_quantity_decimals

    # -- one decoded event ----------------------------------------------------------------
    def judge(self, ev: Any, max_ms: int) -> tuple[PlanIndex, int, list[Value]]:
        """The plan in force, the event time (epoch ms) and the meter values of a decoded
        event, or `Reject`. Called once per event on the hot path (the engine's pass)."""
        tenant = self._tenants.get(ev.subject)
        if tenant is None:
            raise Reject("unknown_tenant", f"tenant '{clip(ev.subject)}' is not in the catalog")
        ts_ms = _ms(ev.time.timestamp())
        if ts_ms < self._min_ms:
            raise Reject("bad_time", f"event time {ev.time.isoformat()} is before {self.lim.min_event_time.date()}, the earliest accepted")
        if ts_ms > max_ms:
            raise Reject(
                "future_time",
                f"event time {ev.time.isoformat()} is more than {self.lim.max_future_seconds:g}s ahead of the clock "
                "(TALLYFLOW_MAX_FUTURE_SECONDS); fix the producer's clock, then re-drive it",
            )
        plan = tenant.only_plan or tenant.plan_at(ts_ms)
        if plan is None or (tenant.until_ms is not None and ts_ms >= tenant.until_ms):
            raise Reject("unknown_tenant", f"tenant '{ev.subject}' has no contract in force at {ev.time.isoformat()}")
        readers = self._plan_readers[plan.pricing_version][type(ev)]
        if not readers:
            raise Reject("unknown_meter", f"plan '{plan.pricing_version}' prices no meter of type '{self.decoder.classes[type(ev)]}'")
        values: list[Value] = []
        for slug, read, is_qty, dims_get, by_cell in readers:
            v = 1 if read is None else read(ev)
            if is_qty and type(v) is Decimal:
                self._check_decimal(slug, v)
            if by_cell is None:
                values.append((slug, v, None))
                continue
            assert dims_get is not None
            cell = dims_get(ev)
            if len(by_cell.cells) > MAX_CELL_CACHE:
                by_cell.cells.clear()
            if by_cell.cell_rater(cell) is None:
                dims = ", ".join(f"{d}={c!r}" for d, c in zip(by_cell.dimensions, cell, strict=True))
                raise Reject(
                    "unpriced_dimension",
                    f"meter '{slug}' of plan '{plan.pricing_version}' has no price for {clip(dims)}: add a cell for it or a "
                    "default_unit_price in the catalog, then re-drive it",
                )
            values.append((slug, v, cell))
        return plan, ts_ms, values

    def judge_credit(self, ev: Any, max_ms: int) -> tuple[TenantIndex, int]:
        """A grant or void event's tenant and event time (the bounds every event is held to);
        the grant itself is judged against the tenant's grants, in the engine."""
        tenant = self._tenants.get(ev.subject)
        if tenant is None:
            raise Reject("unknown_tenant", f"tenant '{clip(ev.subject)}' is not in the catalog")
        ts_ms = _ms(ev.time.timestamp())
        if ts_ms < self._min_ms:
            raise Reject("bad_time", f"event time {ev.time.isoformat()} is before {self.lim.min_event_time.date()}, the earliest accepted")
        if ts_ms > max_ms:
            raise Reject("future_time", f"event time {ev.time.isoformat()} is ahead of the clock (TALLYFLOW_MAX_FUTURE_SECONDS)")
        return tenant, ts_ms

    def _check_decimal(self, slug: str, v: Decimal) -> None:
        """Decimal quantities: finite, non-negative, within the limits of exact rating."""
        if not v.is_finite() or v < 0:
            raise Reject("bad_quantity", f"meter '{slug}' needs a finite non-negative quantity, got {clip(str(v))}")
        if v > self._max_q:
            raise Reject("bad_quantity", f"meter '{slug}': {clip(str(v))} is over the limit of {self._max_q} (TALLYFLOW_MAX_QUANTITY)")
        exp = v.normalize().as_tuple().exponent
        if isinstance(exp, int) and exp < self._min_exp:
            raise Reject(
                "bad_quantity",
                f"meter '{slug}': {clip(str(v))} has more than {-self._min_exp} decimal places (TALLYFLOW_MAX_QUANTITY_DECIMALS)",
            )

    # -- batches ------------------------------------------------------------------------
    def route(
        self, messages: Iterable[Any], topic: str, partition: int, received_at: str, now_ms: int, shard_of: Callable[[str], str]
    ) -> tuple[dict[str, list[Item]], list[DeadLetter]]:
        """The dataflow's intake: decode the messages of one topic partition and hand each
        event, unjudged, to its tenant's shard (judging needs the engine's state anyway, and
        judging there saves building a record per event). What cannot be decoded, or breaks a
        bound of the message, is a dead letter here. Counts every event as a record in."""
        groups: dict[str, list[Item]] = {}
        dead: list[DeadLetter] = []

        def emit(ev: Any, raw: bytes, offset: int, index: int | None) -> None:
            item = (ev, raw, offset, b.max_ms, index)
            k = shard_of(ev.subject)
            g = groups.get(k)
            if g is None:
                groups[k] = [item]
            else:
                g.append(item)

        b = _Batch(topic, partition, received_at, dead, emit)
        decode = self.decoder.single_or_batch.decode
        max_bytes, skew = self.lim.max_message_bytes, self._skew_ms
        it = iter(messages)
        value: bytes | None = None
        offset = 0
        while True:
            try:
                # The hot loop: one typed decode (C) and one append per message of one event.
                for m in it:
                    value, offset = m.value(), m.offset()
                    ts = m.timestamp()[1]
                    b.max_ms = mx = (ts if 0 < ts < now_ms else now_ms) + skew
                    hs = m.headers()
                    if hs:  # perhaps a CloudEvent in binary content mode
                        value = self._binary(b, hs, value, offset)
                        if value is None:
                            continue
                    elif b.headers is not None:
                        b.headers = None
                    if value is None or len(value) > max_bytes:
                        self._guarded(b, value, offset)
                        continue
                    ev = decode(value)
                    if type(ev) is list:
                        self._guarded(b, value, offset)
                        continue
                    k = shard_of(ev.subject)
                    g = groups.get(k)
                    if g is None:
                        groups[k] = [(ev, value, offset, mx, None)]
                    else:
                        g.append((ev, value, offset, mx, None))
                break
            except Exception:  # this message alone goes the slow way; the batch goes on after it
                self._guarded(b, value, offset)
        self.stats.records_in += sum(len(g) for g in groups.values())  # dead letters count themselves in _reject
        return groups, dead

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
        (arrays, messages the typed decoder refuses), per event; inside an event the typed
        decoder reads, what it does not read is skipped without being built, at any depth
        its own recursion limit allows (deeper: `too_deep`)."""
        n0 = len(accepted)

        def emit(ev: Any, raw: bytes, offset: int, index: int | None) -> None:
            try:
                values: list[Value] = []
                if type(ev) in self.decoder.credit_classes:  # a grant or a void: judged whole in the engine
                    pv, (_, ts_ms) = "", self.judge_credit(ev, b.max_ms)
                else:
                    plan, ts_ms, values = self.judge(ev, b.max_ms)
                    pv = plan.pricing_version
            except Reject as r:
                return self._reject(b, r.reason, r.message, raw, offset, index, ev)
            subject = ev.subject
            pos = (offset * 1_000_003 + partition * 65_537 + (0xFFFF if index is None else index)) & 0xFFFFFFFF  # dedup.position
            accepted.append(
                Accepted(
                    subject,
                    pv,
                    xxh3_64_intdigest(f"{subject}\x1f{ev.source}\x1f{ev.id}".encode()),  # dedup.event_hash
                    (pos << 32) | (ts_ms // 3_600_000),  # dedup.meta
                    ev.id,
                    ts_ms,
                    values,
                    raw,
                    topic,
                    partition,
                    offset,
                    index,
                )
            )

        b = _Batch(topic, partition, received_at, dead, emit)
        decode = self.decoder.single_or_batch.decode
        max_bytes, skew = self.lim.max_message_bytes, self._skew_ms
        for m in messages:
            value, offset = m.value(), m.offset()
            ts = m.timestamp()[1]
            b.max_ms = (ts if 0 < ts < now_ms else now_ms) + skew
            b.headers = None
            hs = m.headers()
            if hs:
                value = self._binary(b, hs, value, offset)
                if value is None:
                    continue
            try:
                ev = decode(value) if value is not None and len(value) <= max_bytes else None
            except Exception:
                ev = None
            if ev is None or type(ev) is list:
                self._guarded(b, value, offset)
            else:
                self._element(b, ev, value or b"", offset, None)
        self.stats.records_in += len(accepted) - n0  # dead letters count themselves in _reject

    def _binary(self, b: _Batch, headers: Any, value: bytes | None, offset: int) -> bytes | None:
        """A binary-mode message as structured JSON (and its headers kept on the batch for its
        dead letters); None when it was dead-lettered here."""
        b.headers = None
        try:
            got = binary_to_structured(headers, value)
        except (UnicodeDecodeError, NotJsonData) as e:
            kept = {
                k: clip(v.decode(errors="replace") if isinstance(v, bytes) else str(v), MAX_HEADER_CHARS)
                for k, v in list(headers)[:MAX_HEADERS]
            }
            b.headers, b.body = kept, value or b""
            reason: DeadLetterReason = "schema" if isinstance(e, NotJsonData) else "invalid_json"
            self._reject(b, reason, str(e) if isinstance(e, NotJsonData) else f"a header is not UTF-8: {e}", value or b"", offset)
            return None
        if got is None:
            return value  # headers, but no CloudEvent in them: structured mode
        structured, b.headers = got
        b.body = value or b""
        return structured

    def _guarded(self, b: _Batch, value: bytes | None, offset: int) -> None:
        """The slow path for one message, with a failure of ours dead-lettering it alone:
        what it emitted is kept only once the whole message was judged."""
        n_dead = len(b.dead)
        emitted: list[tuple[Any, bytes, int, int | None]] = []
        emit = b.emit
        b.emit = lambda ev, raw, off, index: emitted.append((ev, raw, off, index))
        try:
            self._slow(b, value, offset)
        except Exception as e:
            for d in b.dead[n_dead:]:
                self._uncount(d)
            del b.dead[n_dead:]  # nothing half-judged stays
            emitted.clear()
            why = internal_error(e, "validating an event", topic=b.topic, partition=b.partition, offset=offset)
            self._reject(b, "internal_error", why, value or b"", offset)
        finally:
            b.emit = emit
        for ev, raw, off, index in emitted:
            self._element(b, ev, raw, off, index)

    # -- the slow path ------------------------------------------------------------------
    def _slow(self, b: _Batch, value: bytes | None, offset: int) -> None:
        """Everything the fast path leaves: limits, arrays, and messages that failed to decode."""
        payload = value or b""
        if not payload:
            return self._reject(b, "invalid_json", "empty message (a tombstone?)", payload, offset)
        lim = self.lim
        if len(payload) > lim.max_message_bytes:
            return self._reject(
                b,
                "too_large",
                f"message of {len(payload):,} bytes is over the limit of {lim.max_message_bytes:,} (TALLYFLOW_MAX_MESSAGE_BYTES)",
                payload,
                offset,
            )
        depth = nesting_depth(payload)
        if depth > lim.max_depth:
            if payload.lstrip()[:1] == b"[":
                return self._elements(b, payload, offset)  # the bound is per event: each element is held to it alone
            return self._too_deep(b, depth, payload, offset)
        try:
            decoded = self.decoder.single_or_batch.decode(payload)
        except msgspec.ValidationError as e:
            if payload.lstrip()[:1] == b"[":
                return self._elements(b, payload, offset)
            who = self._identity(payload)
            return self._reject(b, "bad_grant" if who.type in CREDIT_TYPES else _classify(e), str(e), payload, offset, None, who)
        except (msgspec.DecodeError, UnicodeDecodeError) as e:
            if payload.lstrip()[:1] == b"[":
                return self._elements(b, payload, offset)
            return self._reject(b, "invalid_json", _not_json(e), payload, offset)
        except RecursionError:
            return self._reject(b, "too_deep", "nested deeper than the decoder can follow", payload, offset)
        if isinstance(decoded, list):
            if not decoded:
                return self._reject(b, "schema", "an empty JSON array holds no events", payload, offset)
            for i, ev in enumerate(decoded):
                # Elements share the message as payload; `index` says which one a dead letter is.
                b.emit(ev, payload, offset, i)
        else:
            b.emit(decoded, payload, offset, None)

    def _elements(self, b: _Batch, payload: bytes, offset: int) -> None:
        """An array with a bad element: judge each element on its own."""
        why = ""
        try:
            elements: list[bytes] | None = [bytes(r) for r in self.decoder.raw_array.decode(payload)]
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as e:
            why = _not_json(e)
            elements = array_elements(payload)  # an element with bad UTF-8 or escapes: cut out by structure
        if elements is None:
            return self._reject(b, "invalid_json", f"{why or 'not JSON'}; not a readable JSON array", payload, offset)
        if not elements:
            return self._reject(b, "schema", "an empty JSON array holds no events", payload, offset)
        one = self.decoder.one.decode
        max_depth = self.lim.max_depth
        for i, raw in enumerate(elements):
            depth = nesting_depth(raw)
            if depth > max_depth:
                self._too_deep(b, depth, raw, offset, i)
                continue
            try:
                ev = one(raw)
            except msgspec.ValidationError as e:
                who = self._identity(raw)
                self._reject(b, "bad_grant" if who.type in CREDIT_TYPES else _classify(e), str(e), raw, offset, i, who)
                continue
            except (msgspec.DecodeError, UnicodeDecodeError) as e:
                self._reject(b, "invalid_json", _not_json(e), raw, offset, i)
                continue
            b.emit(ev, raw, offset, i)

    def _too_deep(self, b: _Batch, depth: int, raw: bytes, offset: int, index: int | None = None) -> None:
        why = f"arrays and objects nested {depth} deep; the limit is {self.lim.max_depth} (TALLYFLOW_MAX_DEPTH)"
        self._reject(b, "too_deep", why, raw, offset, index, self._identity(raw))  # who it was, if readable

    def _element(self, b: _Batch, ev: Any, raw: bytes, offset: int, index: int | None) -> None:
        """One decoded event of a message judged the slow way; a failure of ours on it
        spares its neighbours."""
        try:
            b.emit(ev, raw, offset, index)
        except Exception as e:
            why = internal_error(e, "validating an event", topic=b.topic, partition=b.partition, offset=offset, index=index)
            self._reject(b, "internal_error", why, raw, offset, index, ev)

    def _identity(self, raw: bytes) -> Identity:
        """Tenant and event id of an event that failed validation, when its envelope says."""
        try:
            return self.decoder.identity.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return Identity()

    def _reject(
        self, b: _Batch, reason: DeadLetterReason, message: str, raw: bytes, offset: int, index: int | None = None, who: Any = None
    ) -> None:
        self.stats.records_in += 1
        self.stats.dead[reason] += 1
        d = self.dead_letter(reason, message, raw, b.topic, b.partition, offset, b.received, index, who)
        if b.headers is not None and index is None:  # binary mode: as it was sent, headers and body
            d = dead_letter(reason, d.message, b.body, b.topic, b.partition, offset, b.received, None, d.event_id, d.tenant_id, b.headers)
        b.dead.append(d)

    @staticmethod
    def dead_letter(
        reason: DeadLetterReason,
        message: str,
        raw: bytes,
        topic: str,
        partition: int,
        offset: int,
        received: str,
        index: int | None = None,
        who: Any = None,
    ) -> DeadLetter:
        """A dead letter naming the tenant and event id when `who` (an envelope) says them."""
        subject, event_id = (getattr(who, "subject", None), getattr(who, "id", None)) if who is not None else (None, None)
        return dead_letter(
            reason,
            message,
            raw,
            topic,
            partition,
            offset,
            received,
            index,
            event_id if isinstance(event_id, str) else None,
            subject if isinstance(subject, str) else None,
        )

    def _uncount(self, d: DeadLetter) -> None:
        self.stats.records_in -= 1
        self.stats.dead[d.reason] -= 1


def _dims_getter(paths: list[str]) -> Callable[[Any], tuple[str, ...]]:
    """Reads a meter's dimension values, as a tuple in the meter's order."""
    get: Callable[[Any], Any] = operator.attrgetter(*(f"data.{p}" for p in paths))
    if len(paths) == 1:
        return lambda ev: (get(ev),)
    return get


def _not_json(e: Exception) -> str:
    return f"not UTF-8: {e}" if isinstance(e, UnicodeDecodeError) else f"not JSON: {e}"
