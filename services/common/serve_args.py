"""Reading a Serve application's ``args`` inside a replica.

A Serve replica is an entry point: this is where a deployment turns its (secret-free) args, one typed
model per application, into validated configs and, only here, reads the environment variables that the
args name (the Redis password) and the mesh secret. Nothing below a deployment reads the environment.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import BaseModel

from services.common.config import CommonConfig, build
from services.common.context import MESH_SECRET_ENV, ContextSigner

Args = TypeVar("Args", bound=BaseModel)


def app_args(model_cls: type[Args], args: dict[str, Any] | Args | None, app: str) -> Args:
    """A Serve application's ``args`` as its typed model: a dict (from a Serve config) is validated, and a
    bad field fails with its path (``ConfigError``: ``serve args of the encoder: settings.batching...``)."""
    if isinstance(args, model_cls):
        return args
    return build(model_cls, dict(args or {}), f"serve args of the {app}")


def redis_url_with_password(cfg: CommonConfig, environ: dict[str, str] | None = None) -> str:
    """The configured Redis URL with the password from ``redis.password_env`` filled in (if set)."""
    return _with_password(cfg.redis.url, cfg.redis.password_env, environ)


def limits_redis_url(cfg: CommonConfig, environ: dict[str, str] | None = None) -> str:
    """The Redis of the limit counters and usage records, password filled in: ``redis.limits_url`` with
    ``redis.limits_password_env``, or, when that is empty, the cache's URL and password."""
    if not cfg.redis.limits_url:
        return redis_url_with_password(cfg, environ)
    return _with_password(cfg.redis.limits_url, cfg.redis.limits_password_env, environ)


def _with_password(url: str, password_env: str, environ: dict[str, str] | None) -> str:
    env = os.environ if environ is None else environ
    password = env.get(password_env, "") if password_env else ""
    if not url or not password:
        return url
    parts = urlsplit(url)
    if parts.password:
        return url
    netloc = f":{quote(password, safe='')}@{parts.hostname or ''}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def mesh_signer(service: str, environ: dict[str, str] | None = None) -> ContextSigner:
    """The signer of the mesh secret (``IVM_MESH_SECRET``): the gateway signs every request context
    with it, every service verifies (``service`` names it in audit events). A replica without it does
    not start."""
    return ContextSigner.from_env(MESH_SECRET_ENV, environ, service=service)
