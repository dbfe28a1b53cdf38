"""Telemetry: log entries (instance output, request logs, platform events) in a bounded
SQLite file, Prometheus metrics, and the billing meter with Cloud Run's rules.

``billing`` and the parsing half of ``logs`` are pure; storage runs on one worker thread;
``collector`` is the only part that touches the runtime and the event loop.
"""
