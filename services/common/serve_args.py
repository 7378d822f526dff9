"""Reading a Serve application's ``args`` inside a replica.

A Serve replica is an entry point: this is where a deployment turns its (secret-free) args into
validated configs and, only here, reads the environment variables that the args name (the Redis
password). Nothing below a deployment reads the environment.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from services.common.config import CommonConfig, build


def common_config(common: dict[str, Any] | None) -> CommonConfig:
    return build(CommonConfig, dict(common or {}), "serve args: common")


def redis_url_with_password(cfg: CommonConfig, environ: dict[str, str] | None = None) -> str:
    """The configured Redis URL with the password from ``redis.password_env`` filled in (if set)."""
    url = cfg.redis.url
    env = os.environ if environ is None else environ
    password = env.get(cfg.redis.password_env, "") if cfg.redis.password_env else ""
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
