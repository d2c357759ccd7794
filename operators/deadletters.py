"""Dead letters that always fit an output message, and failures of our own made harmless.

A dead letter keeps the original bytes so the event can be re-driven once its cause is
fixed; when they would not fit the producer's maximum message size, a prefix is kept with
the original's length and SHA-256 (which identify it), and echoed values are cut.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import traceback

import msgspec

from schemas.outputs import ENCODER, DeadLetter, DeadLetterReason

log = logging.getLogger(__name__)
MAX_MESSAGE_CHARS = 1000  # a dead letter's human message
MAX_ECHO_CHARS = 120  # a value quoted inside it
MAX_ID_CHARS = 512  # event and tenant ids carried along
_MARGIN = 512  # record overhead the producer adds around key and value


def clip(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """`text`, cut to `limit` characters with a note of how much was left out."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} chars)"


def dead_letter(
    reason: DeadLetterReason,
    message: str,
    raw: bytes,
    topic: str,
    partition: int,
    offset: int,
    received_at: str,
    index: int | None = None,
    event_id: str | None = None,
    tenant_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> DeadLetter:
    return DeadLetter(
        reason=reason,
        message=clip(message, MAX_MESSAGE_CHARS),
        payload=raw,
        payload_bytes=len(raw),
        payload_sha256=hashlib.sha256(raw).hexdigest(),
        topic=topic,
        partition=partition,
        offset=offset,
        received_at=received_at,
        index=index,
        event_id=clip(event_id, MAX_ID_CHARS) if event_id is not None else None,
        tenant_id=clip(tenant_id, MAX_ID_CHARS) if tenant_id is not None else None,
        headers=headers,
    )


def encode_fitted(d: DeadLetter, max_bytes: int) -> bytes:
    """The dead letter as JSON of at most `max_bytes` (minus the record overhead): the
    payload is cut to the prefix that fits (it is base64 in JSON: 4 bytes per 3)."""
    limit = max(1024, max_bytes - _MARGIN)
    out = ENCODER.encode(d)
    if len(out) <= limit:
        return out
    rest = len(out) - len(base64.b64encode(d.payload))
    keep = max(0, (limit - rest) * 3 // 4 - 3)
    return ENCODER.encode(msgspec.structs.replace(d, payload=d.payload[:keep]))


_DEAD = msgspec.json.Decoder(DeadLetter)


def shrink_encoded(value: bytes) -> bytes:
    """An encoded dead letter made smaller (a quarter of its payload, a short message), for
    a broker whose message limit is below the producer's."""
    d = _DEAD.decode(value)
    return ENCODER.encode(msgspec.structs.replace(d, payload=d.payload[: min(1024, len(d.payload) // 4)], message=clip(d.message, 200)))


def stack_hash(exc: BaseException) -> str:
    """A short, stable name for where a failure happened (files, functions and lines, not
    values), so the same bug on many events is one line to search for."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = "|".join(f"{f.filename.rsplit('/', 1)[-1]}:{f.name}:{f.lineno}" for f in frames)
    return hashlib.sha1(f"{type(exc).__name__}|{where}".encode()).hexdigest()[:12]


def internal_error(exc: BaseException, what: str, **fields: object) -> str:
    """Log a failure of ours on one event (with its stack) and return the dead letter's
    message; the event is dead-lettered, its neighbours go on."""
    h = stack_hash(exc)
    log.error("internal error %s while %s: %s", h, what, clip(repr(exc), 300), exc_info=exc, extra={"stack_hash": h, **fields})
    return f"internal error {h} while {what}: {clip(type(exc).__name__ + ': ' + str(exc), 300)}; this is a Tallyflow bug, please report it"
