"""Bearer tokens per client, with scopes, from a mounted file; never logged.

    clients:
      - {name: billing-svc, token: "s3cret", scopes: [ingest, read], rate_per_second: 20000}
      - {name: portal-eu, token: "s3cret2", scopes: [read], tenants: [t-0001, "eu-*"]}

`tenants` binds a token to the tenants it serves (exact ids; an entry ending in `*` is a
prefix), so a token can be handed to a customer-facing page; without it a token serves every
tenant. Tokens are kept only as SHA-256 digests, so a lookup compares digests (no timing leak
on the token itself) and a memory dump holds no usable token.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Literal

import msgspec
import yaml

from runtime.settings import ConfigError

# credits:write: grant and void prepaid credits; review:write: list and decide what waits for review
Scope = Literal["ingest", "read", "credits:write", "review:write"]


class ClientEntry(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    token: str
    scopes: list[Scope]
    rate_per_second: float | None = None
    tenants: list[str] | None = None  # None: every tenant


class TokenFile(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    clients: list[ClientEntry] = []


class Client(msgspec.Struct, frozen=True):
    name: str
    scopes: frozenset[str]
    rate_per_second: float | None
    tenants: frozenset[str] | None = None  # exact ids; None: every tenant
    prefixes: tuple[str, ...] = ()

    def serves(self, tenant_id: str) -> bool:
        if self.tenants is None:
            return True
        return tenant_id in self.tenants or tenant_id.startswith(self.prefixes)

    @property
    def bound(self) -> bool:
        """Bound to some tenants (a request naming another is refused)."""
        return self.tenants is not None


def _tenants(entries: list[str] | None, where: str) -> tuple[frozenset[str] | None, tuple[str, ...]]:
    """Exact ids and prefixes (`eu-*`); a `*` elsewhere would read as a pattern it is not."""
    if entries is None:
        return None, ()
    if not entries:
        raise ConfigError(f"{where}: an empty list serves no tenant; list tenant ids or prefixes like eu-*, or omit it for every tenant")
    exact: set[str] = set()
    prefixes: list[str] = []
    for e in entries:
        if not e or "*" in e[:-1]:
            raise ConfigError(f"{where}: '{e}' is not a tenant id or a prefix; write an exact id, or a prefix ending in one *")
        if e.endswith("*"):
            prefixes.append(e[:-1])
        else:
            exact.add(e)
    return frozenset(exact), tuple(prefixes)


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Tokens:
    def __init__(self, clients: dict[str, Client]) -> None:
        self.by_digest = clients

    @classmethod
    def load(cls, path: str) -> Tokens:
        if not path:
            return cls({})
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
            parsed = msgspec.convert(raw, TokenFile)
        except (OSError, yaml.YAMLError, msgspec.ValidationError) as e:
            raise ConfigError(
                f"TALLYFLOW_API_TOKENS_FILE={path}: {e}; expected `clients: [{{name, token, scopes: [ingest, read]}}]`"
            ) from None
        out: dict[str, Client] = {}
        for i, c in enumerate(parsed.clients):
            if len(c.token) < 16:
                raise ConfigError(
                    f"TALLYFLOW_API_TOKENS_FILE={path}: the token of {c.name} is shorter than 16 characters; use a long random one"
                )
            exact, prefixes = _tenants(c.tenants, f"TALLYFLOW_API_TOKENS_FILE={path}: clients[{i}].tenants ({c.name})")
            out[digest(c.token)] = Client(c.name, frozenset(c.scopes), c.rate_per_second, exact, prefixes)
        return cls(out)

    def client(self, authorization: str | None) -> Client | None:
        """The client a `Bearer <token>` header names, or None. A browser may send the token
        as the password of HTTP Basic (the usage page asks for it that way)."""
        if not authorization:
            return None
        if authorization.startswith("Bearer "):
            return self.by_digest.get(digest(authorization[7:].strip()))
        if authorization.startswith("Basic "):
            try:
                _, _, token = base64.b64decode(authorization[6:].strip(), validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
            return self.by_digest.get(digest(token))
        return None
