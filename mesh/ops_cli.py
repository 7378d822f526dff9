"""``internvl-mesh keys`` (API keys in the tenants file) and ``internvl-mesh usage`` (usage summaries).

The key commands edit the tenants file the gateway reloads every 2 s, so adding, revoking, rotating and
expiring keys needs no restart. A new key is printed once and only its digest is stored. Every write
validates the whole file first (the gateway would refuse an invalid one and keep the old keys) and
replaces the file atomically (a reload never sees half a file). With a Kubernetes secret, edit a local
copy and apply it as the secret (see docs/operations.md).

This module is an entry point: it reads the HMAC secret from the environment variable the file names.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from pydantic import ValidationError

from gateway.tenancy.config import SCOPE_CHAT, SCOPES, TenantsFile
from gateway.tenancy.keys import create_key
from services.common.config import ConfigError, format_validation_error
from services.common.errors import InvalidArgument, MeshError

keys_app = typer.Typer(
    help="API keys of the tenants file: create, list, revoke, rotate, remove.", no_args_is_help=True
)

TenantsFileOption = Annotated[
    Path, typer.Option("--tenants-file", "-f", help="The tenants YAML the gateway reloads.")
]
DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])\Z")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# -- the tenants file ---------------------------------------------------------------------------------
def parse_duration(text: str) -> timedelta:
    """``90s``, ``15m``, ``2h``, ``30d``."""
    m = DURATION.match(text.strip())
    if not m:
        raise InvalidArgument(f"{text!r} is not a duration: use a number and s, m, h or d (e.g. 24h)")
    return timedelta(seconds=float(m.group(1)) * UNITS[m.group(2)])


def parse_instant(text: str, now: datetime) -> datetime:
    """An ISO 8601 time (UTC if no zone) or a duration before ``now`` (``24h`` = a day ago)."""
    if DURATION.match(text.strip()):
        return now - parse_duration(text)
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgument(
            f"{text!r} is neither an ISO time (2025-01-31T12:00Z) nor a duration (24h)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def load_doc(path: Path) -> dict[str, Any]:
    """The file as data, validated as the gateway would."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read tenants file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"tenants file {path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"tenants file {path} must hold a mapping at the top level")
    _validate(doc, str(path))
    return doc


def write_doc(path: Path, doc: dict[str, Any]) -> None:
    """Validate, then replace the file atomically, keeping its permissions."""
    _validate(doc, str(path))
    text = yaml.safe_dump(doc, sort_keys=False)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _validate(doc: dict[str, Any], source: str) -> TenantsFile:
    try:
        return TenantsFile.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def hmac_secret_of(doc: dict[str, Any], env=os.environ.get) -> bytes | None:
    """The HMAC secret the gateway digests keys with: the value of the file's ``hmac_secret_env``."""
    name = doc.get("hmac_secret_env")
    if not name:
        return None
    value = env(name)
    if not value:
        raise ConfigError(
            f"the tenants file names hmac_secret_env {name!r}: set that variable to the gateway's secret"
        )
    return value.encode("utf-8")


def add_key(
    doc: dict[str, Any],
    tenant: str,
    *,
    hmac_secret: bytes | None,
    key_id: str | None = None,
    expires_at: datetime | None = None,
    now: datetime,
    scopes: list[str] | None = None,
) -> str:
    """Append a new key of ``tenant`` to ``doc``; returns the plain key (show it once). ``scopes``:
    what it may call (default ``["chat"]``)."""
    if tenant not in {t.get("name") for t in doc.get("tenants") or []}:
        raise InvalidArgument(f"unknown tenant {tenant!r}: add it to the tenants file first")
    plain, entry = create_key(
        tenant, key_id=key_id, expires_at=expires_at, hmac_secret=hmac_secret, now=now, scopes=scopes
    )
    doc.setdefault("keys", []).append(entry.model_dump(mode="json", exclude_none=True))
    return plain


def _entry(doc: dict[str, Any], key_id: str) -> dict[str, Any]:
    for entry in doc.get("keys") or []:
        if entry.get("key_id") == key_id:
            return entry
    raise InvalidArgument(f"no key with key_id {key_id!r} in the tenants file")


def revoke_key(doc: dict[str, Any], key_id: str) -> None:
    _entry(doc, key_id)["revoked"] = True


def remove_key(doc: dict[str, Any], key_id: str) -> None:
    entry = _entry(doc, key_id)
    doc["keys"] = [e for e in doc["keys"] if e is not entry]


def rotate_key(
    doc: dict[str, Any],
    tenant: str,
    *,
    window: timedelta,
    hmac_secret: bytes | None,
    now: datetime,
    scopes: list[str] | None = None,
) -> tuple[str, list[str]]:
    """Add a new key for ``tenant`` and make its other live keys expire after ``window``.

    Both work until then, so clients can switch over. The new key holds ``scopes``, by default every
    scope the keys it replaces hold (``chat`` when there are none). Returns the new key and the old
    key ids.
    """
    end = (now + window).replace(microsecond=0)
    old, held = [], set()
    for entry in doc.get("keys") or []:
        if entry.get("tenant") != tenant or entry.get("revoked"):
            continue
        current = entry.get("expires_at")
        if current is not None and _as_utc(current) <= now:
            continue  # already expired
        if current is None or _as_utc(current) > end:
            entry["expires_at"] = end.isoformat().replace("+00:00", "Z")
        old.append(entry["key_id"])
        held.update(entry.get("scopes") or [SCOPE_CHAT])
    if scopes is None:
        scopes = [s for s in SCOPES if s in held] or [SCOPE_CHAT]
    return add_key(doc, tenant, hmac_secret=hmac_secret, now=now, scopes=scopes), old


def _as_utc(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return parse_instant(str(value), datetime.now(UTC))


def key_rows(doc: dict[str, Any], now: datetime) -> list[dict[str, str]]:
    """One row per key: id, tenant, state (active, expires soon, expired, revoked), dates. No digests."""
    parsed = _validate(doc, "tenants file")
    rows = []
    for k in parsed.keys:
        state = "revoked" if k.revoked else "expired" if k.expired(now) else "active"
        rows.append(
            {
                "key_id": k.key_id,
                "tenant": k.tenant,
                "state": state,
                "scopes": ",".join(k.scopes),
                "created_at": k.created_at.isoformat(),
                "expires_at": k.expires_at.isoformat() if k.expires_at else "never",
            }
        )
    return rows


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max([len(c), *(len(str(r[c])) for r in rows)]) for c in columns}
    typer.echo("  ".join(c.upper().ljust(widths[c]) for c in columns))
    for r in rows:
        typer.echo("  ".join(str(r[c]).ljust(widths[c]) for c in columns))


def _fail(exc: MeshError) -> None:
    typer.echo(f"error: {exc.message}", err=True)
    raise typer.Exit(code=2)


# -- keys commands ------------------------------------------------------------------------------------
@keys_app.command("create")
def keys_create(
    tenants_file: TenantsFileOption,
    tenant: Annotated[str, typer.Option(help="Tenant the key acts for (must be in the file).")],
    key_id: Annotated[str | None, typer.Option(help="Public key id; default: 12 random hex digits.")] = None,
    expires_in: Annotated[
        str | None, typer.Option(help="The key stops working after this (e.g. 90d).")
    ] = None,
    scope: Annotated[
        list[str] | None,
        typer.Option(
            help="What the key may call, repeatable: chat (the public chat API), tile, embed, decode "
            "(the internal preprocess, encoder and decoder APIs through the gateway); default: chat."
        ),
    ] = None,
) -> None:
    """Create a key: print it once (it cannot be shown again) and store only its digest."""
    now = datetime.now(UTC).replace(microsecond=0)
    try:
        doc = load_doc(tenants_file)
        expires = now + parse_duration(expires_in) if expires_in else None
        plain = add_key(
            doc,
            tenant,
            hmac_secret=hmac_secret_of(doc),
            key_id=key_id,
            expires_at=expires,
            now=now,
            scopes=scope or None,
        )
        write_doc(tenants_file, doc)
    except MeshError as exc:
        _fail(exc)
    typer.echo(
        f"created key {doc['keys'][-1]['key_id']} for tenant {tenant} "
        f"(scopes {','.join(doc['keys'][-1]['scopes'])}); it works after the next reload.",
        err=True,
    )
    typer.echo("store it now, it is not shown again:", err=True)
    typer.echo(plain)


@keys_app.command("list")
def keys_list(tenants_file: TenantsFileOption) -> None:
    """List tenants (with their live key counts) and keys (never their digests)."""
    now = datetime.now(UTC)
    try:
        doc = load_doc(tenants_file)
        rows = key_rows(doc, now)
    except MeshError as exc:
        _fail(exc)
    tenants = [
        {
            "tenant": t["name"],
            "models": ",".join(t.get("allowed_models") or ["*"]),
            "priority": t.get("priority", 0),
            "active_keys": sum(1 for r in rows if r["tenant"] == t["name"] and r["state"] == "active"),
        }
        for t in doc.get("tenants") or []
    ]
    _print_table(tenants, ["tenant", "models", "priority", "active_keys"])
    typer.echo("")
    _print_table(rows, ["key_id", "tenant", "state", "scopes", "created_at", "expires_at"])


@keys_app.command("revoke")
def keys_revoke(tenants_file: TenantsFileOption, key_id: Annotated[str, typer.Argument()]) -> None:
    """Mark a key revoked: refused within one reload interval, and kept in the file for the record."""
    try:
        doc = load_doc(tenants_file)
        revoke_key(doc, key_id)
        write_doc(tenants_file, doc)
    except MeshError as exc:
        _fail(exc)
    typer.echo(f"revoked key {key_id}")


@keys_app.command("remove")
def keys_remove(tenants_file: TenantsFileOption, key_id: Annotated[str, typer.Argument()]) -> None:
    """Delete a key's entry (it stops working at the next reload)."""
    try:
        doc = load_doc(tenants_file)
        remove_key(doc, key_id)
        write_doc(tenants_file, doc)
    except MeshError as exc:
        _fail(exc)
    typer.echo(f"removed key {key_id}")


@keys_app.command("rotate")
def keys_rotate(
    tenants_file: TenantsFileOption,
    tenant: Annotated[str, typer.Option(help="Tenant whose keys to rotate.")],
    window: Annotated[str, typer.Option(help="How long the old keys keep working (e.g. 24h).")] = "24h",
    scope: Annotated[
        list[str] | None,
        typer.Option(help="Scopes of the new key, repeatable; default: those of the keys it replaces."),
    ] = None,
) -> None:
    """Create a new key and let the tenant's other keys expire after the window: both work until then."""
    now = datetime.now(UTC).replace(microsecond=0)
    try:
        doc = load_doc(tenants_file)
        plain, old = rotate_key(
            doc,
            tenant,
            window=parse_duration(window),
            hmac_secret=hmac_secret_of(doc),
            now=now,
            scopes=scope or None,
        )
        write_doc(tenants_file, doc)
    except MeshError as exc:
        _fail(exc)
    typer.echo(
        f"created key {doc['keys'][-1]['key_id']} for tenant {tenant} "
        f"(scopes {','.join(doc['keys'][-1]['scopes'])}); "
        f"{', '.join(old) or 'no other keys'} expire at {(now + parse_duration(window)).isoformat()}",
        err=True,
    )
    typer.echo("store it now, it is not shown again:", err=True)
    typer.echo(plain)


# -- usage --------------------------------------------------------------------------------------------
def usage_command(
    since: Annotated[str, typer.Option(help="Start: an ISO time (UTC if no zone) or a duration ago (24h).")],
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    until: Annotated[str | None, typer.Option(help="End (exclusive), like --since; default: now.")] = None,
    redis_url: Annotated[
        str, typer.Option(envvar="IVM_REDIS_URL", help="redis://[:password@]host:port/db holding the stream.")
    ] = "",
    stream: Annotated[str, typer.Option(help="The usage stream: <redis.key_prefix>:usage.")] = "ivm:usage",
    jsonl: Annotated[Path | None, typer.Option(help="Read a usage JSONL file instead of Redis.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Summarise usage records per tenant and model (each request id counted once)."""
    import json

    from gateway.usage import read_jsonl, read_stream, summarise

    now = datetime.now(UTC)
    try:
        start = parse_instant(since, now).timestamp()
        end = parse_instant(until, now).timestamp() if until else None
    except MeshError as exc:
        _fail(exc)
    if jsonl is not None:
        records = read_jsonl(jsonl, since=start, until=end, tenant=tenant)
    elif redis_url:
        import redis

        records = read_stream(redis.Redis.from_url(redis_url), stream, since=start, until=end, tenant=tenant)
    else:
        _fail(InvalidArgument("give --redis-url (or IVM_REDIS_URL) or --jsonl"))
    totals = summarise(records)
    rows = [{"tenant": t, "model": m, **v.to_dict()} for (t, m), v in sorted(totals.items())]
    if as_json:
        typer.echo(json.dumps({"since": start, "until": end or time.time(), "rows": rows}, indent=2))
        return
    if not rows:
        typer.echo("no usage records in that range")
        return
    for r in rows:
        r["statuses"] = ",".join(f"{k}={v}" for k, v in sorted(r["requests_by_status"].items()))
    _print_table(
        rows,
        [
            "tenant",
            "model",
            "requests",
            "statuses",
            "prompt_tokens",
            "image_tokens",
            "completion_tokens",
            "total_tokens",
            "tiles",
            "cache_hits",
        ],
    )


def register_ops_commands(app: typer.Typer) -> None:
    """Add ``keys`` and ``usage`` to the ``internvl-mesh`` app."""
    app.add_typer(keys_app, name="keys")
    app.command("usage", help="Summarise usage records per tenant and model.")(usage_command)
