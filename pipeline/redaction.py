"""Credentials out of every URL that is shown or stored: a URL's user-info and its signed query parameters
(``X-Amz-Signature``, ``X-Amz-Credential``, ``X-Amz-Security-Token``, ``sig``, ``token``, ...) become ``***``.

The real URL lives only in memory (the parsed command line); config dumps, checkpoints, MLflow params, tags,
datasets and artifacts, log lines and error messages get :func:`redact`'s form. A redacted URL given back as
``--data`` is refused in one line (:func:`is_redacted`): pass the URL with its credentials again, set
``CPVT_DATA_ROOT`` to it (what ``launchers/slurm_submit.py`` does for its jobs), or keep the credentials out of
the URL (``~/.netrc`` for HTTP, the AWS environment for S3). Written by hand: no dependency offers it (MLflow
and boto3 each hide only their own secrets).
"""
from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"
# query parameters that carry a signature, a credential or a token (matched case-insensitively): AWS SigV4 and
# SigV2, GCS V4, Azure SAS, and the generic names
SECRET_PARAMS = frozenset({
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "awsaccesskeyid", "signature",
    "x-goog-signature", "x-goog-credential", "sig", "token", "access_token", "auth", "password",
    "secret", "api_key", "apikey", "key",
})
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
_PARAM = re.compile(r"(?P<name>[^&=;]+)=(?P<value>[^&;]*)")


def redact_url(url: str) -> str:
    """``url`` with its user-info and secret query values replaced by ``***`` (anything else unchanged)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    query = _PARAM.sub(lambda m: f"{m['name']}={MASK}" if m["name"].lower() in SECRET_PARAMS else m[0], parts.query)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(text: str) -> str:
    """``text`` with every URL in it redacted by :func:`redact_url` (punctuation that ends a URL's sentence,
    ``:,.;)]``, stays outside it)."""
    def one(m: re.Match) -> str:
        url = m[0].rstrip(":,.;)]")
        return redact_url(url) + m[0][len(url):]
    return _URL.sub(one, text) if "://" in text else text


def redact_values(data):
    """A copy of a (nested) mapping / list with every string redacted: params and config dicts."""
    if isinstance(data, str):
        return redact(data)
    if isinstance(data, dict):
        return {k: redact_values(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(redact_values(v) for v in data)
    return data


def is_redacted(url: str) -> bool:
    """A URL that :func:`redact_url` already masked (its credentials are gone)."""
    if "://" not in url:
        return False
    parts = urlsplit(url)
    return parts.netloc.startswith(f"{MASK}@") or any(
        m["value"] == MASK and m["name"].lower() in SECRET_PARAMS for m in _PARAM.finditer(parts.query))


__all__ = ["MASK", "SECRET_PARAMS", "is_redacted", "redact", "redact_url", "redact_values"]
