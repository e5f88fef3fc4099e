"""An MLflow tracking server that stops answering under a stage: one line for the user, a retry once it is back.

MLflow wraps a failed HTTP call in an ``MlflowException`` whose text runs to several hundred characters
(the endpoint, urllib3's pool and connection objects, the errno). :func:`server_errors` turns the ones
that mean "the tracking server does not answer" into :class:`TrackingUnavailable`, one line naming the
server; a stage prints it as its ``error:`` line and the flows retry that stage once the server answers
again (``flows/dvc_cli.py``). The run the stage had open cannot be ended while the server is away: it
gets one quick try (:func:`end_active_run`), and otherwise the next attempt of the stage ends it
(:func:`knn_diffusion.tracking.end_lost_attempts`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator
from urllib.parse import urlparse

UNREACHABLE = "is unreachable"  # in every TrackingUnavailable message; the flows look for it in a stage's output
# Text of what requests / urllib3 raise when nothing answers, and the reason the message gives.
_MARKERS = {"Connection refused": "connection refused", "Connection aborted": "connection dropped",
            "RemoteDisconnected": "connection dropped", "Connection reset": "connection reset",
            "Read timed out": "timed out", "ConnectTimeout": "timed out", "Name or service not known": "unknown host",
            "Failed to establish a new connection": "no connection"}


class TrackingUnavailable(ConnectionError):
    """The MLflow tracking server does not answer: one line for the user; a retry may pass once it is back."""


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def unreachable_reason(err: BaseException, uri: str) -> str:
    """Why ``err`` (or what it wraps) means that the HTTP tracking server at ``uri`` does not answer, in a few
    words; '' when it is anything else (another server down, a refused request, a file store)."""
    url = urlparse(uri)
    if url.scheme not in ("http", "https") or not url.hostname:
        return ""
    port = url.port or (443 if url.scheme == "https" else 80)
    names = (f"{url.scheme}://{url.netloc}", f"{url.hostname}:{port}", f"host='{url.hostname}', port={port}")
    texts = [str(e) for e in _chain(err)]
    if not any(name in text for text in texts for name in names):
        return ""
    return next((reason for text in texts for marker, reason in _MARKERS.items() if marker in text), "")


def unavailable(uri: str, reason: str, doing: str) -> TrackingUnavailable:
    return TrackingUnavailable(f"MLflow tracking server at {uri} {UNREACHABLE} ({reason}) {doing}; start it again "
                               "or point MLFLOW_TRACKING_URI at a live one, then rerun")


@contextlib.contextmanager
def server_errors(uri: str, doing: str) -> Iterator[None]:
    """Raise what the block raises, except that an error meaning the tracking server at ``uri`` does not answer
    becomes :class:`TrackingUnavailable` (``doing``: what was under way, for the message)."""
    try:
        yield
    except TrackingUnavailable:
        raise
    except Exception as err:
        reason = unreachable_reason(err, uri)
        if not reason:
            raise
        raise unavailable(uri, reason, doing) from err


def end_active_run(status: str) -> bool:
    """End the active fluent run with ``status`` in one try, without MLflow's HTTP retries (up to 4 minutes of
    backoff by default): the server has just failed to answer. False when it still does not."""
    import mlflow

    knobs = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {key: os.environ.get(key) for key in knobs}
    os.environ.update(knobs)
    try:
        mlflow.end_run(status=status)  # leaves no active run even when the call fails
        return True
    except Exception:
        return False
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
