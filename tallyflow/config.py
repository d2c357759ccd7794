"""Settings: defaults < config file (TALLYFLOW_CONFIG, YAML) < TALLYFLOW_* environment.

Kafka client settings pass through to librdkafka unchanged: `kafka:` in the file, or
TALLYFLOW_KAFKA_<NAME> in the environment (`_` becomes `.`, lower-cased), e.g.
TALLYFLOW_KAFKA_SECURITY_PROTOCOL=SASL_SSL.
"""

from __future__ import annotations

import difflib
import gc
import os
import sys
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import yaml

from schemas.errors import TallyflowError
from schemas.events import InputLimits

PREFIX = "TALLYFLOW_"
# Secrets come from the environment or from a mounted file (TALLYFLOW_<NAME>_FILE), never
# from the catalog, and are masked wherever settings are printed.
SECRET_FIELDS = ("crm_token", "erp_token", "success_hmac_key")  # what the dataflows authenticate with
SANDBOX_SECRET_FIELDS = ("sandbox_admin_token",)
# Settings that may carry credentials inside them (user:password@ in a URL): masked when
# printed, and also readable from a mounted file.
URL_FIELDS = ("redis_url", "crm_url", "success_url", "erp_url")
FILE_FIELDS = (*SECRET_FIELDS, *SANDBOX_SECRET_FIELDS, "redis_url")
KAFKA_PREFIX = PREFIX + "KAFKA_"
# librdkafka secrets that may come from a mounted file: TALLYFLOW_KAFKA_SASL_PASSWORD_FILE.
KAFKA_FILE_KEYS = ("sasl.password", "ssl.key.password", "sasl.oauthbearer.client.secret")
_SECRET_WORDS = ("password", "secret", "token", "key", "credential")
Pos = Annotated[float, msgspec.Meta(gt=0)]
NonNegF = Annotated[float, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(gt=0)]


class ConfigError(TallyflowError):
    """A setting that cannot be used; the message names the variable and the fix."""


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    brokers: str = "127.0.0.1:9092"
    input_topic: str = "usage.events"
    alerts_topic: str = "usage.alerts"
    rated_topic: str = "usage.rated"
    dlq_topic: str = "usage.dlq"
    catalog: str = str(Path(__file__).resolve().parent.parent / "examples" / "catalog.yaml")
    window_seconds: Pos = 60.0
    allowed_lateness_seconds: NonNegF = 0.0
    grace_seconds: NonNegF = 3600.0
    dedup_horizon_seconds: Pos = 3600.0
    idle_timeout_seconds: Pos = 30.0
    shards: PosInt = 64
    batch_size: PosInt = 1000
    start_from: str = "earliest"
    metrics_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0  # 0: no /metrics, /healthz, /readyz endpoint
    log_format: str = "json"  # "json": one object per line with correlation ids; "text" for people
    log_level: str = "INFO"
    consumer_group_prefix: str = "tallyflow"  # positions committed as <prefix>-rating|alerts|erp, for lag tooling only
    cluster_port: Annotated[int, msgspec.Meta(gt=0, le=65535)] = 2101  # Bytewax inter-process port in a StatefulSet
    cluster_check_seconds: NonNegF = 30.0  # how often a pod compares its cluster size with the StatefulSet; 0: never
    kafka: dict[str, str] = {}
    # recovery
    recovery_dir: str = ""  # Bytewax recovery partitions; empty: no recovery (restart re-reads)
    recovery_partitions: PosInt = 1
    snapshot_interval_seconds: PosInt = 10
    backup_interval_seconds: Annotated[int, msgspec.Meta(ge=0)] = 0  # keep older snapshots this long (for backups of the store)
    dedup_store_days: NonNegF = 7.0  # long-horizon dedup in Redis; 0 turns it off
    emission_register: bool = True  # settle rated lines against Redis (crash-safe replays)
    register_ttl_days: Pos = 62.0
    catalog_reload_seconds: NonNegF = 5.0  # how often to look for a changed catalog file; 0: never
    # input bounds: anything beyond them is a dead letter, judged before it can change state
    max_message_bytes: PosInt = 1 << 20  # bigger -> too_large
    max_depth: PosInt = 32  # nesting of arrays and objects; deeper -> too_deep
    max_id_length: PosInt = 256
    max_source_length: PosInt = 256
    max_subject_length: PosInt = 128
    max_value_length: PosInt = 256  # a UNIQUE_COUNT value
    max_quantity: Decimal = Decimal(10**15)
    max_quantity_decimals: Annotated[int, msgspec.Meta(ge=0, le=12)] = 9
    max_future_seconds: NonNegF = 300.0  # event time ahead of the clock; further -> future_time
    # delivery
    exceptions_topic: str = "usage.exceptions"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "tallyflow"  # namespaces the ledger, dedup store and register keys
    ledger_ttl_days: Pos = 35.0
    crm_url: str = "http://127.0.0.1:8787"
    success_url: str = "http://127.0.0.1:8787"
    erp_url: str = "http://127.0.0.1:8787"
    crm_token: str = ""
    erp_token: str = ""
    success_hmac_key: str = ""
    sandbox_admin_token: str = ""  # `tallyflow sandbox` only: guards its fault-injection API
    sink_timeout_seconds: Pos = 5.0
    crm_rate_per_second: Pos = 100.0
    success_rate_per_second: Pos = 100.0
    erp_rate_per_second: Pos = 5.0
    erp_batch_max_lines: PosInt = 500
    erp_batch_max_latency_seconds: Pos = 2.0
    retry_base_seconds: Pos = 0.2
    retry_cap_seconds: Pos = 10.0
    retry_after_cap_seconds: Pos = 300.0  # the longest Retry-After a destination may impose
    breaker_threshold: PosInt = 5
    breaker_reset_seconds: Pos = 5.0

    def masked(self) -> dict[str, Any]:
        """The effective configuration with secrets replaced, for start-up logs."""
        d: dict[str, Any] = msgspec.to_builtins(self)
        for f in (*SECRET_FIELDS, *SANDBOX_SECRET_FIELDS):
            d[f] = "***" if d[f] else ""
        for f in URL_FIELDS:
            d[f] = mask_url(d[f])
        d["kafka"] = {k: ("***" if any(w in k.lower() for w in _SECRET_WORDS) else v) for k, v in self.kafka.items()}
        return d

    def limits(self) -> InputLimits:
        return InputLimits(
            max_message_bytes=self.max_message_bytes,
            max_depth=self.max_depth,
            max_id_length=self.max_id_length,
            max_source_length=self.max_source_length,
            max_subject_length=self.max_subject_length,
            max_value_length=self.max_value_length,
            max_quantity=self.max_quantity,
            max_quantity_decimals=self.max_quantity_decimals,
            max_future_seconds=self.max_future_seconds,
        )

    def output_max_bytes(self) -> int:
        """The largest message the producer may write (librdkafka's message.max.bytes)."""
        return int(self.kafka.get("message.max.bytes", 1_000_000))


def mask_url(url: str) -> str:
    """`scheme://user:password@host` -> `scheme://user:***@host` (any URL with credentials)."""
    parts = urlsplit(url)
    if parts.password is None and not (parts.username and "@" in parts.netloc):
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    cred = f"{user}:***" if parts.password is not None else "***"
    return urlunsplit(parts._replace(netloc=f"{cred}@{host}"))


def _env_name(field: str) -> str:
    return PREFIX + field.upper()


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from file and environment; raise ConfigError naming the culprit."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    path = env.get(PREFIX + "CONFIG")
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{PREFIX}CONFIG={path}: cannot read it as YAML ({e}); point it at a readable YAML file") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{PREFIX}CONFIG={path}: expected a mapping of setting: value")
        raw.update(loaded)
    fields = set(Settings.__struct_fields__)
    kafka = dict(raw.get("kafka") or {})
    unknown: list[str] = []
    for k, v in env.items():
        if k.startswith(KAFKA_PREFIX):
            key = k[len(KAFKA_PREFIX) :].lower().replace("_", ".")
            if key.endswith(".file") and key[:-5] in KAFKA_FILE_KEYS:
                kafka[key[:-5]] = _read_secret(k, v)
            else:
                kafka[key] = v
        elif k.startswith(PREFIX) and k != PREFIX + "CONFIG":
            name = k[len(PREFIX) :].lower()
            if name in fields and name != "kafka":
                raw[name] = v
            elif not (name.endswith("_file") and name[:-5] in FILE_FIELDS):
                unknown.append(k)
    raw["kafka"] = {str(k): str(v) for k, v in kafka.items()}
    for f in FILE_FIELDS:
        path = env.get(_env_name(f) + "_FILE")
        if path:
            raw[f] = _read_secret(_env_name(f) + "_FILE", path)
    raw.update(overrides)
    _warn_unknown(unknown)
    try:
        s = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as e:
        msg = str(e)
        field = msg.rsplit("$.", 1)[-1].split("`")[0].split(".")[0] if "$." in msg else ""
        hint = f" (set {_env_name(field)} or '{field}:' in the config file)" if field in fields else ""
        raise ConfigError(f"invalid setting: {msg}{hint}") from None
    if s.grace_seconds < s.allowed_lateness_seconds:
        raise ConfigError(
            f"{_env_name('grace_seconds')} ({s.grace_seconds}) must be >= {_env_name('allowed_lateness_seconds')} "
            f"({s.allowed_lateness_seconds}); raise the grace or lower the lateness"
        )
    if s.log_format not in ("json", "text"):
        raise ConfigError(f"{_env_name('log_format')}={s.log_format!r}: use 'json' or 'text'")
    if s.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{_env_name('log_level')}={s.log_level!r}: use DEBUG, INFO, WARNING or ERROR")
    if s.start_from not in ("earliest", "latest"):
        raise ConfigError(f"{_env_name('start_from')}={s.start_from!r}: use 'earliest' or 'latest'")
    return s


def _read_secret(var: str, path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(f"{var}={path}: {e.strerror}; mount the secret there or unset it") from None


_WARNED: set[str] = set()


def _warn_unknown(names: list[str]) -> None:
    """A typo (TALLYFLOW_BROKER) would otherwise be ignored in silence."""
    valid = [_env_name(f) for f in Settings.__struct_fields__ if f != "kafka"] + [PREFIX + "CONFIG"]
    for name in sorted(set(names) - _WARNED):
        _WARNED.add(name)
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.7)
        hint = f"; did you mean {close[0]}?" if close else "; see `tallyflow config` for the settings"
        print(f"tallyflow: warning: {name} is not a setting and is ignored{hint}", file=sys.stderr)


def to_env(s: Settings) -> dict[str, str]:
    """The TALLYFLOW_* environment that reproduces `s` in another process."""
    env = {_env_name(k): str(v) for k, v in msgspec.to_builtins(s).items() if k != "kafka"}
    env.update({KAFKA_PREFIX + k.upper().replace(".", "_"): v for k, v in s.kafka.items()})
    return env


def tune_gc() -> None:
    """Long-lived state makes the default collector rescan it constantly (measured: halves
    batched throughput); collect young objects rarely and freeze what start-up built."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def kafka_config(s: Settings, **extra: Any) -> dict[str, Any]:
    """librdkafka settings: ours first, the user's pass-through last (theirs win)."""
    return {"bootstrap.servers": s.brokers, **extra, **s.kafka}
