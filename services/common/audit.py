"""Audit events: one JSON line each on the ``internvl_mesh.audit`` logger, for the gateway and every
service alike (``gateway.audit`` lists the gateway's events; the services write ``context_refused``).

The payload is also attached to the log record as ``record.audit`` for JSON formatters. Events never
carry a key, a digest, a secret or user text.
"""

from __future__ import annotations

import json
import logging
from typing import Any

AUDIT_LOGGER = "internvl_mesh.audit"


def audit_event(event: str, logger: logging.Logger | None = None, **fields: Any) -> None:
    payload = {"event": event, **{k: v for k, v in fields.items() if v is not None}}
    (logger or logging.getLogger(AUDIT_LOGGER)).info(
        json.dumps(payload, sort_keys=True, default=str), extra={"audit": payload}
    )
