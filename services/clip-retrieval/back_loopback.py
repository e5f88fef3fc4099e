"""``clip-retrieval back`` listening on one address (default loopback) instead of every interface.

``clip-retrieval back`` always binds 0.0.0.0 (it has no host option). This runs the same command, with the
same arguments, from the service's venv, with Flask's ``app.run`` given ``$KNN_SERVED_HOST``
(default 127.0.0.1)::

    .venv-served/bin/python services/clip-retrieval/back_loopback.py --indices_paths served/indices.json --port 1234
"""

import os

import fire
import flask
from clip_retrieval.clip_back import clip_back

_run = flask.Flask.run


def _run_on_host(app, host=None, port=None, **options):
    return _run(app, host=os.environ.get("KNN_SERVED_HOST", "127.0.0.1"), port=port, **options)


if __name__ == "__main__":
    flask.Flask.run = _run_on_host
    fire.Fire(clip_back)
