"""A measuring process for the crash tests, run as ``python _crash_writer.py FOLDER N DELAY``.

Opens the embedded catalog in FOLDER for writing, subscribes the CatalogWriter and runs a
slow plan that emits N (z, blur) events into the scores stream, DELAY seconds apart.
After each event has gone through the writer (so it is journaled) it prints
``EVENT <i> <z> <blur>`` and flushes stdout; the test kills the process with SIGKILL
somewhere in the middle. ``READY <pid>`` is printed once the catalog is open.
"""

from __future__ import annotations

import sys
import time


def main(argv: list[str]) -> int:
    folder, n, delay = argv[0], int(argv[1]), float(argv[2])

    import bluesky.plan_stubs as bps
    import bluesky.preprocessors as bpp
    from bluesky import RunEngine
    from ophyd import Signal

    from bluesky_deepfocus.schema import MD_KEY, SCORES_STREAM
    from bluesky_deepfocus.storage import open_catalog, subscribe_writer

    catalog = open_catalog(folder)
    RE = RunEngine({})
    subscribe_writer(RE, catalog)

    def report(name, doc):
        if name == "event" and "blur" in doc["data"]:
            z, blur = doc["data"]["z"], doc["data"]["blur"]
            print(f"EVENT {doc['seq_num']} {z!r} {blur!r}", flush=True)

    RE.subscribe(report)  # after the writer: a printed event is already journaled
    z, blur = Signal(name="z", value=0.0), Signal(name="blur", value=0.0)
    md = {"plan_name": "autofocus_plan", MD_KEY: {"objective": "10x/0.3", "start_z": 0.0}}

    @bpp.run_decorator(md=md)
    def slow_scan():
        for i in range(n):
            z.put(float(i))
            blur.put(1.0 + 0.5 * abs(i - 3))
            yield from bps.trigger_and_read([z, blur], name=SCORES_STREAM)
            yield from bps.sleep(delay)

    print(f"READY {__import__('os').getpid()}", flush=True)
    RE(slow_scan())
    time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
