"""Run one stage module and record what it read: ``python stage_tracer.py MODULE TRACE.json [args...]``.

Files come from the interpreter's audit events (``open``, ``os.listdir``, ``os.scandir``: what Python
code opens or lists; native readers such as faiss' are not seen), modules from ``sys.modules`` at exit.
"""

from __future__ import annotations

import atexit
import json
import os
import runpy
import sys

EVENTS = {"open", "os.listdir", "os.scandir"}


def main() -> None:
    module, trace_path, *args = sys.argv[1:]
    files: set[str] = set()
    dirs: set[str] = set()

    def hook(event: str, event_args: tuple) -> None:
        if event in EVENTS and event_args and isinstance(event_args[0], (str, bytes, os.PathLike)):
            (files if event == "open" else dirs).add(os.path.abspath(os.fsdecode(event_args[0])))

    def dump() -> None:
        modules = sorted({os.path.abspath(m.__file__) for m in list(sys.modules.values())
                          if getattr(m, "__file__", None)})
        with open(trace_path, "w") as fh:
            json.dump({"files": sorted(files), "dirs": sorted(dirs), "modules": modules}, fh)

    atexit.register(dump)
    sys.addaudithook(hook)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
