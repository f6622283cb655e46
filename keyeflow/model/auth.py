"""The bearer token the servers keyeflow starts (the model server, the synthetic teacher) may require.

One token, from `--api-key` or the server's `KEYEFLOW_API_KEY` environment variable (which, unlike a flag,
does not show in the process list). Clients (`OpenAICompatibleGenerator`) read theirs from an environment
variable they are told the name of, so a token never sits in a config, an MLflow param or a log.
"""

from __future__ import annotations

import hmac

API_KEY_ENV = "KEYEFLOW_API_KEY"
OPEN_PATHS = frozenset({"/health"})  # what a load balancer or a start-up probe asks without credentials


def bearer_ok(authorization: str | None, api_key: str) -> bool:
    """Whether an Authorization header carries exactly `api_key` as its bearer token (constant-time)."""
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())
