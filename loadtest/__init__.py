"""Locust load tests of KOA-Serve: the users (``locustfile.py``) and a headless runner (``run.py``,
``python -m loadtest.run``, ``make loadtest``).

The pure parts they share with the benchmarks and the drills (request images, the answer schema, the
loopback guard) live in `ops.load`, importable without Locust and its gevent monkey-patching.
"""
