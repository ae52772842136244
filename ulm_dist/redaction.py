"""Credentials inside URLs (`http://KEY:SECRET@host`), kept out of what is written or printed.

An S3-compatible endpoint, a data location or a store may be given with a user and password in
the URL. The running program uses the URL as given; every copy of a config or state that goes
to a file (config.yaml in the run and log folders, a checkpoint's train_state.json, an
export's config.yaml) or to the terminal has the user:password part replaced by `***`. Those
files are shared, uploaded and pasted into bug reports; the credential belongs in the
environment or the AWS credential chain, not in them.
"""

from __future__ import annotations

import contextlib
import re
import traceback
from collections.abc import Iterator
from typing import Any, TextIO

from ulm_dist.config import Config

REDACTED = "***"
# scheme://userinfo@ : userinfo runs to the last '@' before the host, and cannot hold '/', '?'
# or '#' (RFC 3986), which end the authority part of a URL.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s]+@")


def redact_url(text: str) -> str:
    """`text` with the user:password part of every URL in it replaced by `***`."""
    return _USERINFO.sub(rf"\g<scheme>{REDACTED}@", text)


def redacted(value: Any) -> Any:
    """A copy of a plain value (dicts, lists, strings, numbers) with every string redacted."""
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, dict):
        return {key: redacted(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted(item) for item in value]
    return value


def redacted_config(cfg: Config) -> dict[str, Any]:
    """`cfg.to_dict()` as it may be written to a file: URL credentials redacted."""
    return redacted(cfg.to_dict())


def print_redacted(text: str, file: TextIO | None = None) -> None:
    """print() for a command's output, which ends up in terminals, CI and Ray job logs."""
    print(redact_url(text), file=file, flush=True)


class RedactedError(RuntimeError):
    """An exception whose text held a URL credential, raised again with it redacted."""


@contextlib.contextmanager
def redacted_errors() -> Iterator[None]:
    """Re-raise an exception whose text (its message, traceback or chained causes) holds a URL
    credential as a RedactedError: its first line the original's type and redacted message,
    then the redacted traceback, without the chain. For a Tune trial, whose error Tune writes
    into the sweep's folder (error.txt) as it gets it."""
    try:
        yield
    except Exception as error:
        text = "".join(traceback.format_exception(error))
        if redact_url(text) == text:
            raise
        raise RedactedError(
            f"{type(error).__name__}: {redact_url(str(error))}\n\n{redact_url(text)}"
        ) from None
