"""The input contract: CloudEvents 1.0 in structured JSON mode (SPEC §2.1).

The catalog decides which event types exist and which `data` fields their meters read, so
the decoder is generated from it: a tagged union on `type` whose `data` structs hold just
those fields. msgspec then validates tenant-facing shape, event time and quantities in C,
skips everything else in `data`, and names the failing path for the dead letter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
# Quantities: non-negative integers, or decimals (JSON numbers or decimal strings); never float.
Quantity = Annotated[int, msgspec.Meta(ge=0)] | Decimal
UniqueValue = str | int


class CloudEvent(msgspec.Struct, gc=False, kw_only=True):
    """Envelope fields every event has; `type` is the union tag, `data` is per type.
    Unknown CloudEvents attributes are ignored, not rejected."""

    specversion: Literal["1.0"]
    id: NonEmpty
    source: NonEmpty
    subject: NonEmpty
    time: Annotated[datetime, msgspec.Meta(tz=True)]


class EventDecoder:
    """Decoders for one catalog's event types: a single event or a JSON array of them."""

    def __init__(self, fields_by_type: Mapping[str, Sequence[tuple[str, Any]]]) -> None:
        """`fields_by_type`: event type -> (dotted path in `data`, value type) it must carry."""
        self.classes: dict[type, str] = {}
        variants: list[Any] = []
        for i, (etype, paths) in enumerate(sorted(fields_by_type.items())):
            data_t = _data_struct(f"Data{i}", paths)
            cls = msgspec.defstruct(
                f"Event{i}",
                [("data", data_t if paths else data_t | None, msgspec.NODEFAULT if paths else None)],
                bases=(CloudEvent,),
                tag=etype,
                tag_field="type",
                gc=False,
                kw_only=True,
            )
            self.classes[cls] = etype
            variants.append(cls)
        union: Any = variants[0]
        for v in variants[1:]:
            union = union | v
        self.single_or_batch = msgspec.json.Decoder(union | list[union])
        self.one = msgspec.json.Decoder(union)
        self.raw_array = msgspec.json.Decoder(list[msgspec.Raw])


def _data_struct(name: str, paths: Sequence[tuple[str, Any]]) -> Any:
    tree: dict[str, Any] = {}
    for path, typ in paths:
        node = tree
        parts = path.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"data path '{path}' runs through a value")
        node[parts[-1]] = typ
    return _build(name, tree)


def _build(name: str, tree: dict[str, Any]) -> Any:
    fields = [(k, _build(f"{name}_{k}", v) if isinstance(v, dict) else v) for k, v in sorted(tree.items())]
    return msgspec.defstruct(name, fields, gc=False)
