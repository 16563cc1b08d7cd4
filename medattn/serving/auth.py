"""Bearer-token authentication with three nested roles: admin > expert > predict.

Configuration (a YAML or JSON file, or the same JSON in the ``MEDATTN_TOKENS`` variable)::

    open_predict: false          # true: /predict needs no token at all
    tokens:
      - {name: dr-lee, role: expert, sha256: 9f86d081884c7d65...}
      - {name: ops, role: admin, sha256: 60303ae22b998861...}

Only SHA-256 digests of the tokens are stored, so the file is not a secret worth stealing.
A plain (unsalted, fast) hash is enough because tokens are long random strings made by
``medattn auth hash-token``, not passwords a person picks. Digests are compared with
``hmac.compare_digest`` against every entry, so the time taken does not reveal a near miss.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Optional, Sequence, Union

import typer
import yaml

from medattn.errors import MedattnError, first_line

Role = Literal["predict", "expert", "admin"]
ROLES: tuple[Role, ...] = ("predict", "expert", "admin")  # each one implies those before it
TOKENS_ENV = "MEDATTN_TOKENS"
MIN_TOKEN_LENGTH = 16
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class AuthError(MedattnError):
    """401 (no or bad credentials) or 403 (valid token, role too low); ``status_code`` says which."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


class AuthConfigError(MedattnError):
    """The token file or ``MEDATTN_TOKENS`` is malformed (names the source and entry)."""


def hash_token(token: str) -> str:
    """The hex SHA-256 digest stored in the configuration for ``token``."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def role_allows(role: Role, required: Role) -> bool:
    return ROLES.index(role) >= ROLES.index(required)


@dataclass(frozen=True)
class Principal:
    """Who made a request; ``name`` is ``"anonymous"`` for open prediction."""

    name: str
    role: Role

    def has(self, required: Role) -> bool:
        return role_allows(self.role, required)


@dataclass(frozen=True)
class TokenEntry:
    name: str
    role: Role
    sha256: str


ANONYMOUS = Principal(name="anonymous", role="predict")


class Authenticator:
    """Checks ``Authorization`` header values against the configured token digests."""

    def __init__(self, entries: Sequence[TokenEntry], open_predict: bool = False, source: str = "tokens") -> None:
        if not entries and not open_predict:
            raise AuthConfigError(f"{source}: no tokens and open_predict is false, so every request would be refused")
        self.entries = tuple(entries)
        self.open_predict = open_predict
        self.source = source

    @classmethod
    def from_mapping(cls, raw: Any, source: str, open_predict: Optional[bool] = None) -> "Authenticator":
        """Build from decoded config: ``{"tokens": [...], "open_predict": bool}`` or a bare token list.

        ``open_predict`` given here (the service's own setting) wins over the config's value.
        """
        if isinstance(raw, list):
            raw = {"tokens": raw}
        if not isinstance(raw, Mapping):
            raise AuthConfigError(f"{source}: expected a mapping with a 'tokens' list")
        unknown = sorted(set(raw) - {"tokens", "open_predict"})
        if unknown:
            raise AuthConfigError(f"{source}: unknown key {unknown[0]!r} (known: open_predict, tokens)")
        configured = raw.get("open_predict", False)
        if not isinstance(configured, bool):
            raise AuthConfigError(f"{source}: open_predict must be true or false, got {configured!r}")
        tokens = raw.get("tokens") or []
        if not isinstance(tokens, list):
            raise AuthConfigError(f"{source}: tokens must be a list")
        entries = [_entry(item, f"{source}: tokens[{i}]") for i, item in enumerate(tokens)]
        seen: dict[str, str] = {}
        for entry in entries:
            if entry.sha256 in seen:
                raise AuthConfigError(f"{source}: tokens {seen[entry.sha256]!r} and {entry.name!r} "
                                      "have the same sha256")
            seen[entry.sha256] = entry.name
        return cls(entries, open_predict=configured if open_predict is None else open_predict, source=source)

    @classmethod
    def from_file(cls, path: Union[str, Path], open_predict: Optional[bool] = None) -> "Authenticator":
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))  # YAML is a superset of JSON
        except OSError as exc:
            raise AuthConfigError(f"{path}: cannot read token file ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise AuthConfigError(f"{path}: not valid YAML/JSON ({first_line(exc)})") from None
        return cls.from_mapping(raw, str(path), open_predict)

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None,
                 open_predict: Optional[bool] = None) -> "Authenticator":
        value = (os.environ if environ is None else environ).get(TOKENS_ENV)
        if value is None:
            raise AuthConfigError(f"{TOKENS_ENV} is not set")
        try:
            raw = json.loads(value)
        except json.JSONDecodeError as exc:
            raise AuthConfigError(f"{TOKENS_ENV}: not valid JSON ({exc.msg} at character {exc.pos})") from None
        return cls.from_mapping(raw, TOKENS_ENV, open_predict)

    @classmethod
    def load(cls, path: Optional[Union[str, Path]] = None, environ: Optional[Mapping[str, str]] = None,
             open_predict: Optional[bool] = None) -> "Authenticator":
        """The file when given, else ``MEDATTN_TOKENS``, else (only with ``open_predict=True``)
        no tokens at all: anyone may predict and nobody may do more. Otherwise AuthConfigError."""
        if path is not None:
            return cls.from_file(path, open_predict)
        if TOKENS_ENV in (os.environ if environ is None else environ):
            return cls.from_env(environ, open_predict)
        if open_predict:
            return cls([], open_predict=True, source="open_predict")
        raise AuthConfigError(f"no token configuration: pass a tokens file or set {TOKENS_ENV}")

    def check(self, header_value: Optional[str], required_role: Role) -> Principal:
        """The principal behind an ``Authorization`` header allowed ``required_role``, or AuthError."""
        if required_role not in ROLES:
            raise ValueError(f"unknown role {required_role!r}")  # a bug in the caller, not the client
        if header_value is None or not header_value.strip():
            if required_role == "predict" and self.open_predict:
                return ANONYMOUS
            raise AuthError(401, "missing Authorization header (expected 'Bearer <token>')")
        scheme, _, token = header_value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise AuthError(401, "malformed Authorization header (expected 'Bearer <token>')")
        principal = self._lookup(hash_token(token))
        if principal is None:
            raise AuthError(401, "invalid token")
        if not principal.has(required_role):
            raise AuthError(403, f"token {principal.name!r} has role {principal.role!r}; "
                                 f"this needs {required_role!r}")
        return principal

    def _lookup(self, digest: str) -> Optional[Principal]:
        found: Optional[Principal] = None
        for entry in self.entries:  # no early exit: every request costs the same comparisons
            if hmac.compare_digest(entry.sha256, digest):
                found = Principal(entry.name, entry.role)
        return found


def _entry(item: Any, where: str) -> TokenEntry:
    if not isinstance(item, Mapping):
        raise AuthConfigError(f"{where} must be a mapping with name, role and sha256")
    unknown = sorted(set(item) - {"name", "role", "sha256"})
    if unknown:
        raise AuthConfigError(f"{where}: unknown key {unknown[0]!r} (known: name, role, sha256)")
    name, role, digest = item.get("name"), item.get("role"), item.get("sha256")
    if not isinstance(name, str) or not name.strip():
        raise AuthConfigError(f"{where}.name must be a non-empty string")
    if role not in ROLES:
        raise AuthConfigError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
    if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest.lower()):
        raise AuthConfigError(f"{where}.sha256 must be 64 hex digits (the SHA-256 of the token, "
                              "see `medattn auth hash-token`), not the token itself")
    return TokenEntry(name=name.strip(), role=role, sha256=digest.lower())


def hash_token_command(
    name: Annotated[str, typer.Argument(help="Who the token is for (shown in logs).")],
    role: Annotated[str, typer.Option(help="predict, expert or admin.")] = "expert",
    stdin: Annotated[bool, typer.Option("--stdin", help="Read an existing token from stdin "
                                                        "instead of generating one.")] = False,
) -> None:
    """Print a token-file entry; a new random token is generated unless --stdin gives one."""
    if role not in ROLES:
        raise AuthConfigError(f"--role must be one of {', '.join(ROLES)}, got {role!r}")
    if stdin:
        token = sys.stdin.readline().strip()
        if len(token) < MIN_TOKEN_LENGTH:
            raise AuthConfigError(f"token from stdin must have at least {MIN_TOKEN_LENGTH} characters")
    else:
        token = secrets.token_urlsafe(32)
        # The token itself goes to stderr so that redirecting stdout into the file stores only the digest.
        typer.echo(f"token for {name} (give it to them, it is not stored): {token}", err=True)
    # A YAML list item: `medattn auth hash-token NAME >> tokens.yaml` grows a valid token file.
    typer.echo("- " + json.dumps({"name": name, "role": role, "sha256": hash_token(token)}))
