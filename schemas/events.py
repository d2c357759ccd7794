"""The input contract: CloudEvents 1.0 in structured JSON mode (SPEC §2.1), and its bounds.

The catalog decides which event types exist and which `data` fields their meters read, so
the decoder is generated from it: a tagged union on `type` whose `data` structs hold just
those fields. msgspec then validates tenant-facing shape, field lengths, event time and
quantities in C, skips everything else in `data`, and names the failing path for the dead
letter. `InputLimits` are the bounds every event is held to before it can change state.
"""

from __future__ import annotations

import copyreg
import inspect
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec


class InputLimits(msgspec.Struct, frozen=True, kw_only=True):
    """Bounds on one input message (each a setting; defaults documented in the README)."""

    max_message_bytes: int = 1 << 20
    max_depth: int = 32  # nesting of arrays and objects
    max_id_length: int = 256
    max_source_length: int = 256
    max_subject_length: int = 128
    max_value_length: int = 256  # a UNIQUE_COUNT value
    # Quantities: at most this large and this many decimal places, so that a period's sum
    # and its price stay exact in the widened Decimal context (operators/__init__.py).
    max_quantity: Decimal = Decimal(10**15)
    max_quantity_decimals: int = 9
    min_event_time: datetime = datetime.fromisoformat("2000-01-01T00:00:00+00:00")
    max_future_seconds: float = 300.0  # how far ahead of the wall clock an event time may be


class CloudEvent(msgspec.Struct, gc=False, kw_only=True):
    """A usage event as producers send it (the fields Tallyflow reads; others are ignored).

    `subject` is the tenant; the dedup key is (subject, source, id); `time` is the event
    time (RFC 3339 with a zone) that windows and billing periods use; meters read their
    quantity from `data` by a path such as `tokens` or `usage.bytes`."""

    specversion: Literal["1.0"]
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=256, description="unique per source")]
    source: Annotated[str, msgspec.Meta(min_length=1, max_length=256, description="the emitting service")]
    type: Annotated[str, msgspec.Meta(min_length=1, description="event type; meters select events by it")]
    subject: Annotated[str, msgspec.Meta(min_length=1, max_length=128, description="the tenant id")]
    time: Annotated[datetime, msgspec.Meta(tz=True, description="event time, RFC 3339 with a zone")]
    data: Annotated[dict[str, Any] | None, msgspec.Meta(description="the usage: meters read their quantity from it by path")] = None


def _envelope_base(lim: InputLimits) -> type:
    def text(n: int) -> Any:
        return Annotated[str, msgspec.Meta(min_length=1, max_length=n)]

    return msgspec.defstruct(
        "Envelope",
        [
            ("specversion", Literal["1.0"]),
            ("id", text(lim.max_id_length)),
            ("source", text(lim.max_source_length)),
            ("subject", text(lim.max_subject_length)),
            ("time", Annotated[datetime, msgspec.Meta(tz=True)]),
        ],
        gc=False,
        kw_only=True,
    )


class Identity(msgspec.Struct, gc=False):
    """What a dead letter can still say about an event that failed validation."""

    subject: str | None = None
    id: str | None = None
    type: str | None = None


# Prepaid credits travel on the input topic with the usage (SPEC §9.5), so they are ordered,
# recovered and replayed with it; these event types are Tallyflow's own.
GRANTED = "tallyflow.credit.granted"
VOIDED = "tallyflow.credit.voided"
CREDIT_TYPES = (GRANTED, VOIDED)


class GrantData(msgspec.Struct, gc=False, kw_only=True, forbid_unknown_fields=True):
    grant_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    amount: Decimal
    currency: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}$")]
    priority: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 10
    effective_at: Annotated[datetime, msgspec.Meta(tz=True)]
    expires_at: Annotated[datetime, msgspec.Meta(tz=True)] | None = None
    meters: list[Annotated[str, msgspec.Meta(max_length=128)]] | None = None


class VoidData(msgspec.Struct, gc=False, kw_only=True, forbid_unknown_fields=True):
    grant_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


def _revive(raw: bytes) -> Any:
    """An event that crossed to this process (a worker of another process owns its tenant),
    decoded by this process's latest decoder: its classes are made here, not importable."""
    return _LATEST[-1].one.decode(raw)


def _reduce(ev: Any) -> tuple[Any, tuple[bytes]]:
    return _revive, (msgspec.json.encode(ev),)


_LATEST: list[EventDecoder] = []


class EventDecoder:
    """Decoders for one catalog's event types: a single event or a JSON array of them.

    The event classes are generated, so they cannot be pickled by name: one that Bytewax
    sends to another process travels as its JSON and is decoded there again (`_revive`)."""

    def __init__(self, fields_by_type: Mapping[str, Sequence[tuple[Any, ...]]], limits: InputLimits | None = None) -> None:
        """`fields_by_type`: event type -> (dotted path in `data`, value type[, default]) it
        reads; a field without a default must be there."""
        lim = limits or InputLimits()
        base = _envelope_base(lim)
        self.classes: dict[type, str] = {}
        variants: list[Any] = []
        for i, (etype, paths) in enumerate(sorted(fields_by_type.items())):
            data_t = _data_struct(f"Data{i}", paths)
            # `data` must be there when a meter reads a value from it; a meter reading only
            # dimensions (missing: "") or nothing at all needs none.
            data_field: tuple[Any, ...]
            if not paths:
                data_field = ("data", data_t | None, None)
            elif _all_default(data_t):
                data_field = ("data", data_t, msgspec.field(default_factory=data_t))
            else:
                data_field = ("data", data_t)
            cls = msgspec.defstruct(
                f"Event{i}",
                [data_field],
                bases=(base,),
                tag=etype,
                tag_field="type",
                gc=False,
                kw_only=True,
            )
            self.classes[cls] = etype
            variants.append(cls)
        self.credit_classes: dict[type, str] = {}
        for etype, data_t in ((GRANTED, GrantData), (VOIDED, VoidData)):
            cls = msgspec.defstruct(
                f"Credit{len(self.credit_classes)}", [("data", data_t)], bases=(base,), tag=etype, tag_field="type", gc=False, kw_only=True
            )
            self.credit_classes[cls] = etype
            variants.append(cls)
        union: Any = variants[0]
        for v in variants[1:]:
            union = union | v
        self.single_or_batch = msgspec.json.Decoder(union | list[union])
        self.one = msgspec.json.Decoder(union)
        self.raw_array = msgspec.json.Decoder(list[msgspec.Raw])
        self.identity = msgspec.json.Decoder(Identity)
        for cls in variants:
            copyreg.pickle(cls, _reduce)
        _LATEST[:] = [self]


def quantity_type(limits: InputLimits) -> Any:
    """A meter quantity: a non-negative integer up to the limit, or a decimal (JSON number or
    string) that the validator bounds; never a float."""
    return Annotated[int, msgspec.Meta(ge=0, le=int(limits.max_quantity))] | Decimal


def dimension_type() -> Any:
    """A matrix meter's dimension value (SPEC §9.1): a string of at most 64 characters."""
    return Annotated[str, msgspec.Meta(max_length=64)]


def unique_type(limits: InputLimits) -> Any:
    """A UNIQUE_COUNT value: a bounded string or an integer."""
    return Annotated[str, msgspec.Meta(max_length=limits.max_value_length)] | int


def _data_struct(name: str, paths: Sequence[tuple[Any, ...]]) -> Any:
    tree: dict[str, Any] = {}
    for path, *spec in paths:
        node = tree
        parts = path.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"data path '{path}' runs through a value")
        node[parts[-1]] = tuple(spec)  # (type,) or (type, default)
    return _build(name, tree)


def _build(name: str, tree: dict[str, Any]) -> Any:
    """A struct per object level; an object whose fields all have defaults may be missing."""
    fields: list[tuple[Any, ...]] = []
    for k, v in sorted(tree.items()):
        if isinstance(v, dict):
            sub = _build(f"{name}_{k}", v)
            fields.append((k, sub, msgspec.field(default_factory=sub)) if _all_default(sub) else (k, sub))
        else:
            fields.append((k, *v))
    return msgspec.defstruct(name, fields, gc=False, kw_only=True)


def _all_default(struct: Any) -> bool:
    return all(f.required is False for f in msgspec.structs.fields(struct))


def json_schema() -> dict[str, Any]:
    """JSON Schema of the input event, for producers to validate against (the checked-in
    schemas/cloudevent.schema.json; `python -m schemas.events` prints it)."""
    schema: dict[str, Any] = msgspec.json.schema(CloudEvent)
    event = schema["$defs"]["CloudEvent"]
    event["description"] = inspect.cleandoc(event["description"]).replace("\n", " ")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://tallyflow.dev/schemas/cloudevent.schema.json",
        "title": "Tallyflow usage event (CloudEvents 1.0, structured JSON mode)",
        **schema,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(json_schema(), indent=2, sort_keys=True))
