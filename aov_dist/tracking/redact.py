"""Secrets never reach params, tags, artifacts or logs: values of secret-looking keys are masked."""
from __future__ import annotations

import re
from typing import Any, Mapping

# A secret word as a whole part of the key (parts split by _ - .): "aws_secret_access_key",
# "token", "judge.api_key" match; "max_tokens" / "max_new_tokens" (counts) do not.
SECRET_KEY = re.compile(r"(?:^|[_.\-])(secret|password|passwd|token|api[_-]?key|access[_-]?key|credentials?"
                        r"|private[_-]?key)(?:$|[_.\-])", re.IGNORECASE)
MASK = "***"


def is_secret_key(key: str) -> bool:
    # api_key_env names an environment variable, it is not the key itself
    return bool(SECRET_KEY.search(key)) and not key.lower().endswith("_env")


def redact(obj: Any, key: str = "") -> Any:
    """A copy of a nested mapping/list with every value under a secret-looking key masked."""
    if isinstance(obj, Mapping):
        return {k: (MASK if is_secret_key(str(k)) and v not in (None, "") else redact(v, str(k))) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, key) for v in obj]
    return obj


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are kept as one value."""
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    out[prefix[:-1]] = obj
    return out
