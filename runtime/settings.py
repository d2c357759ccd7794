"""Settings: defaults < config file (TALLYFLOW_CONFIG, YAML) < TALLYFLOW_* environment.

Settings are grouped in sections (`kafka`, `topics`, `engine`, `limits`, `stores`,
`delivery`, `crm`, `success`, `erp`, `tryton`, `api`, `process`, `sandbox`) and each component receives
its own section, not the whole object. They are still read from the same flat names:
`TALLYFLOW_WINDOW_SECONDS` is `engine.window_seconds`, `TALLYFLOW_ERP_URL` is `erp.url`,
`TALLYFLOW_INPUT_TOPIC` is `topics.input`; the config file uses the same flat names in
lower case. Kafka client settings pass through to librdkafka unchanged: `kafka:` in the
file, or TALLYFLOW_KAFKA_<NAME> in the environment (`_` becomes `.`, lower-cased), e.g.
TALLYFLOW_KAFKA_SECURITY_PROTOCOL=SASL_SSL.
"""

from __future__ import annotations

import difflib
import gc
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import msgspec
import yaml

from operators.engine_state import EngineConfig
from schemas.errors import TallyflowError
from schemas.events import InputLimits

PREFIX = "TALLYFLOW_"
KAFKA_PREFIX = PREFIX + "KAFKA_"
# librdkafka secrets that may come from a mounted file: TALLYFLOW_KAFKA_SASL_PASSWORD_FILE.
KAFKA_FILE_KEYS = ("sasl.password", "ssl.key.password", "sasl.oauthbearer.client.secret")
_SECRET_WORDS = ("password", "secret", "token", "key", "credential")
Pos = Annotated[float, msgspec.Meta(gt=0)]
NonNegF = Annotated[float, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(gt=0)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
DEFAULT_CATALOG = str(Path(__file__).resolve().parent.parent / "examples" / "catalog.yaml")


class ConfigError(TallyflowError):
    """A setting that cannot be used; the message names the variable and the fix."""


class KafkaSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    brokers: str = "127.0.0.1:9092"
    librdkafka: dict[str, str] = {}  # pass-through (flat name `kafka`): TALLYFLOW_KAFKA_<NAME>
    batch_size: PosInt = 1000  # messages per consumed batch
    start_from: Literal["earliest", "latest"] = "earliest"  # where to start without recovery state
    consumer_group_prefix: str = "tallyflow"  # positions committed as <prefix>-rating|alerts|erp, for lag tooling only

    def config(self, **ours: Any) -> dict[str, Any]:
        """librdkafka settings: ours first, the user's pass-through last (theirs win)."""
        return {"bootstrap.servers": self.brokers, **ours, **self.librdkafka}

    def output_max_bytes(self) -> int:
        """The largest message the producer may write (librdkafka's message.max.bytes)."""
        return int(self.librdkafka.get("message.max.bytes", 1_000_000))


class Topics(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    input: str = "usage.events"
    alerts: str = "usage.alerts"
    rated: str = "usage.rated"
    dlq: str = "usage.dlq"
    exceptions: str = "usage.exceptions"  # requests a destination rejected for good
    credits: str = "usage.credits"  # the credit ledger: granted, drawn, returned, expired, voided
    review: str = "usage.review"  # lines and credit records held for a person's decision before the ERP
    audit: str = "usage.audit"  # review decisions: who, when, why, what
    status: str = "erp.status"  # invoice states the ERP reached, on their way to the CRM


class EngineSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    window_seconds: Pos = 60.0
    allowed_lateness_seconds: NonNegF = 0.0
    grace_seconds: NonNegF = 3600.0
    dedup_horizon_seconds: Pos = 3600.0
    idle_timeout_seconds: Pos = 30.0
    shards: PosInt = 64

    def config(self) -> EngineConfig:
        return EngineConfig(
            window_ms=int(self.window_seconds * 1000),
            allowed_lateness_ms=int(self.allowed_lateness_seconds * 1000),
            grace_ms=int(self.grace_seconds * 1000),
            dedup_horizon_ms=int(self.dedup_horizon_seconds * 1000),
            idle_timeout_s=self.idle_timeout_seconds,
        )


class StoreSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Redis: the long-horizon dedup store, the emission register, the delivery ledger, the
    read model."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "tallyflow"  # namespaces every key
    dedup_store_days: NonNegF = 7.0  # 0 turns it off
    emission_register: bool = True  # settle rated lines against Redis (crash-safe replays)
    register_ttl_days: Pos = 62.0
    ledger_ttl_days: Pos = 35.0
    read_model: bool = True  # rating keeps per tenant/meter/period usage in Redis for `tallyflow api`
    read_model_interval_seconds: Pos = 0.2  # a touched tenant's usage is written at most this often
    read_model_days: Pos = 400.0  # kept this long after its period ends

    def key(self, name: str) -> str:
        return f"{self.redis_prefix}:{name}"


class DeliverySettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Policies every destination shares."""

    sink_timeout_seconds: Pos = 5.0
    retry_base_seconds: Pos = 0.2
    retry_cap_seconds: Pos = 10.0
    retry_after_cap_seconds: Pos = 300.0  # the longest Retry-After a destination may impose
    breaker_threshold: PosInt = 5
    breaker_reset_seconds: Pos = 5.0
    # Alert requests in flight per destination: enough to reach 100 requests/s against a
    # remote answering in 150 ms; a stop leaves at most this many in doubt (re-sent, same key).
    alert_max_in_flight: PosInt = 16


DestinationKind = Literal["http", "tryton"]


class CrmSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    kind: DestinationKind = "http"  # http: signals to crm_url; tryton: leads in Tryton (the tryton_* settings)
    url: str = "http://127.0.0.1:8787"
    token: str = ""
    rate_per_second: Pos = 100.0


class SuccessSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    url: str = "http://127.0.0.1:8787"
    hmac_key: str = ""
    rate_per_second: Pos = 100.0


class ErpSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    kind: DestinationKind = "http"  # http: batches to erp_url; tryton: usage records in Tryton (the tryton_* settings)
    url: str = "http://127.0.0.1:8787"
    token: str = ""
    rate_per_second: Pos = 5.0
    batch_max_lines: PosInt = 500
    batch_max_latency_seconds: Pos = 2.0
    webhook_secret: str = ""  # Standard Webhooks key (`whsec_<base64>`) the ERP signs invoice statuses with; empty: none taken


class TrytonSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Tryton's JSON-RPC, used when erp_kind or crm_kind is `tryton`."""

    url: str = "http://127.0.0.1:8000"
    database: str = "tallyflow"
    user: str = "admin"
    password: str = ""
    timeout_seconds: Pos = 60.0  # one call per micro-batch; a timed-out call is re-sent and found "existing"


class ApiSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`tallyflow api`: HTTP ingest, usage queries, the page; and its bounds on slow clients."""

    host: str = "127.0.0.1"
    port: Port = 8080
    tokens_file: str = ""  # YAML: {clients: [{name, token, scopes: [ingest, read], rate_per_second}]}; empty: every request 401
    max_body_bytes: PosInt = 4 * 1024 * 1024  # one request; each event is also bounded by max_message_bytes
    events_per_second: Pos = 50_000.0  # per client token, unless its entry says otherwise
    produce_timeout_seconds: Pos = 5.0  # the broker must acknowledge (acks=all) within this, else 503
    limit_concurrency: PosInt = 1000  # connections and requests in flight per process; past it uvicorn answers 503
    keep_alive_seconds: PosInt = 5  # an idle keep-alive connection is closed after this
    header_timeout_seconds: Pos = 10.0  # a request's line and headers must arrive within this, else the connection is closed
    max_header_bytes: PosInt = 64 * 1024  # a request's line and headers at most this, else 431 and close
    body_timeout_seconds: Pos = 60.0  # a posted body must arrive within this, else 408
    workers: PosInt = 1  # processes behind one port (serving/server.py); on Kubernetes: 1 per pod, scale pods


class ProcessSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a dataflow process runs: its catalog, endpoints, logs, cluster and recovery."""

    catalog: str = DEFAULT_CATALOG
    catalog_reload_seconds: NonNegF = 5.0  # how often to look for a changed catalog file; 0: never
    metrics_port: Port = 0  # 0: no /metrics, /healthz, /readyz endpoint
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"] = "INFO"
    cluster_port: Annotated[int, msgspec.Meta(gt=0, le=65535)] = 2101  # Bytewax inter-process port in a StatefulSet
    cluster_check_seconds: NonNegF = 30.0  # how often a pod compares its cluster size with the StatefulSet; 0: never
    recovery_dir: str = ""  # Bytewax recovery partitions; empty: no recovery (a restart re-reads)
    recovery_partitions: PosInt = 1
    snapshot_interval_seconds: PosInt = 10
    backup_interval_seconds: Annotated[int, msgspec.Meta(ge=0)] = 0


class SandboxSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    admin_token: str = ""  # `tallyflow sandbox` only: guards its fault-injection API


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    kafka: KafkaSettings = KafkaSettings()
    topics: Topics = Topics()
    engine: EngineSettings = EngineSettings()
    limits: InputLimits = InputLimits()
    stores: StoreSettings = StoreSettings()
    delivery: DeliverySettings = DeliverySettings()
    crm: CrmSettings = CrmSettings()
    success: SuccessSettings = SuccessSettings()
    erp: ErpSettings = ErpSettings()
    tryton: TrytonSettings = TrytonSettings()
    api: ApiSettings = ApiSettings()
    process: ProcessSettings = ProcessSettings()
    sandbox: SandboxSettings = SandboxSettings()

    def masked(self) -> dict[str, Any]:
        """The effective configuration by flat name, secrets replaced, for start-up logs."""
        flat = flatten(self)
        for name in SECRETS:
            flat[name] = "***" if flat[name] else ""
        for name in URLS:
            flat[name] = mask_url(flat[name])
        flat["kafka"] = {k: ("***" if any(w in k.lower() for w in _SECRET_WORDS) else v) for k, v in flat["kafka"].items()}
        return flat

    def replace(self, **flat: Any) -> Settings:
        """A copy with some settings changed, by flat name (as in the environment)."""
        sections: dict[str, dict[str, Any]] = {}
        for name, value in flat.items():
            section, field = _locate(name)
            sections.setdefault(section, {})[field] = value
        return msgspec.structs.replace(
            self, **{sec: msgspec.structs.replace(getattr(self, sec), **fields) for sec, fields in sections.items()}
        )


# Section -> how its fields are named flat ("{}" is the field).
_NAMING = {
    "kafka": "{}",
    "topics": "{}_topic",
    "engine": "{}",
    "limits": "{}",
    "stores": "{}",
    "delivery": "{}",
    "crm": "crm_{}",
    "success": "success_{}",
    "erp": "erp_{}",
    "tryton": "tryton_{}",
    "api": "api_{}",
    "process": "{}",
    "sandbox": "sandbox_{}",
}
FLAT: dict[str, tuple[str, str]] = {}  # flat name -> (section, field)
for _sec in msgspec.structs.fields(Settings):
    for _field in msgspec.structs.fields(_sec.type):
        _flat = "kafka" if (_sec.name, _field.name) == ("kafka", "librdkafka") else _NAMING[_sec.name].format(_field.name)
        assert _flat not in FLAT, f"two settings are named {_flat}"
        FLAT[_flat] = (_sec.name, _field.name)
# Secrets come from the environment or a mounted file (TALLYFLOW_<NAME>_FILE), never from
# the catalog, and are masked wherever settings are printed; URLs may carry credentials.
SECRETS = ("crm_token", "erp_token", "success_hmac_key", "sandbox_admin_token", "tryton_password", "erp_webhook_secret")
DATAFLOW_SECRETS = ("crm_token", "erp_token", "success_hmac_key")  # what the dataflows authenticate with
URLS = ("redis_url", "crm_url", "success_url", "erp_url", "tryton_url")
FILE_FIELDS = (*SECRETS, "redis_url")


def _locate(name: str) -> tuple[str, str]:
    try:
        return FLAT[name]
    except KeyError:
        raise ConfigError(f"no setting is named {name}") from None


def env_name(flat: str) -> str:
    return PREFIX + flat.upper()


def flatten(s: Settings) -> dict[str, Any]:
    """Every setting by flat name (what `TALLYFLOW_<NAME>` and the config file use)."""
    out: dict[str, Any] = {}
    for flat, (section, field) in FLAT.items():
        out[flat] = msgspec.to_builtins(getattr(getattr(s, section), field))
    return out


def mask_url(url: str) -> str:
    """`scheme://user:password@host` -> `scheme://user:***@host` (any URL with credentials)."""
    parts = urlsplit(url)
    if parts.password is None and not (parts.username and "@" in parts.netloc):
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    cred = f"{user}:***" if parts.password is not None else "***"
    return urlunsplit(parts._replace(netloc=f"{cred}@{host}"))


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build Settings from file and environment; raise ConfigError naming the culprit.
    `overrides` use flat names, as the environment does."""
    env = os.environ if env is None else env
    raw = _from_file(env)
    kafka = {str(k): str(v) for k, v in dict(raw.pop("kafka", None) or {}).items()}
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
            if name in FLAT and name != "kafka":
                raw[name] = v
            elif not (name.endswith("_file") and name[:-5] in FILE_FIELDS):
                unknown.append(k)
    for f in FILE_FIELDS:
        path = env.get(env_name(f) + "_FILE")
        if path:
            raw[f] = _read_secret(env_name(f) + "_FILE", path)
    raw.update(overrides)
    raw["kafka"] = {**kafka, **{str(k): str(v) for k, v in dict(raw.get("kafka") or {}).items()}}
    _warn_unknown(unknown)
    return _build(raw)


def _from_file(env: Mapping[str, str]) -> dict[str, Any]:
    path = env.get(PREFIX + "CONFIG")
    if not path:
        return {}
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{PREFIX}CONFIG={path}: cannot read it as YAML ({e}); point it at a readable YAML file") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{PREFIX}CONFIG={path}: expected a mapping of setting: value")
    bad = sorted(k for k in loaded if k not in FLAT)
    if bad:
        raise ConfigError(f"{PREFIX}CONFIG={path}: {', '.join(map(str, bad))} is not a setting; see `tallyflow config` for the names")
    return dict(loaded)


def _build(raw: dict[str, Any]) -> Settings:
    nested: dict[str, dict[str, Any]] = {}
    for name, value in raw.items():
        section, field = _locate(name)
        nested.setdefault(section, {})[field] = value
    try:
        s = msgspec.convert(nested, Settings, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(_explain(str(e))) from None
    eng = s.engine
    if eng.grace_seconds < eng.allowed_lateness_seconds:
        raise ConfigError(
            f"{env_name('grace_seconds')} ({eng.grace_seconds}) must be >= {env_name('allowed_lateness_seconds')} "
            f"({eng.allowed_lateness_seconds}); raise the grace or lower the lateness"
        )
    return s


def _explain(msg: str) -> str:
    """msgspec names `$.engine.window_seconds`; people set TALLYFLOW_WINDOW_SECONDS."""
    path = msg.rsplit("$.", 1)[-1].split("`")[0] if "$." in msg else ""
    parts = path.split(".")
    flat = next((f for f, loc in FLAT.items() if loc == tuple(parts[:2])), "")
    if not flat:
        return f"invalid setting: {msg}"
    return f"invalid setting {env_name(flat)} ('{flat}:' in the config file): {msg.rsplit(' - at ', 1)[0]}"


def _read_secret(var: str, path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError(f"{var}={path}: {e.strerror}; mount the secret there or unset it") from None


_WARNED: set[str] = set()


def _warn_unknown(names: list[str]) -> None:
    """A typo (TALLYFLOW_BROKER) would otherwise be ignored in silence."""
    valid = [env_name(f) for f in FLAT if f != "kafka"] + [PREFIX + "CONFIG"]
    for name in sorted(set(names) - _WARNED):
        _WARNED.add(name)
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.7)
        hint = f"; did you mean {close[0]}?" if close else "; see `tallyflow config` for the settings"
        print(f"tallyflow: warning: {name} is not a setting and is ignored{hint}", file=sys.stderr)


def to_env(s: Settings) -> dict[str, str]:
    """The TALLYFLOW_* environment that reproduces `s` in another process."""
    flat = flatten(s)
    kafka: dict[str, str] = flat.pop("kafka")
    env = {env_name(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in flat.items()}
    env.update({KAFKA_PREFIX + k.upper().replace(".", "_"): v for k, v in kafka.items()})
    return env


def tune_gc() -> None:
    """Long-lived state makes the default collector rescan it constantly (measured: halves
    batched throughput); collect young objects rarely and freeze what start-up built."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
