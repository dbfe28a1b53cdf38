"""The reconcile loop: turns the pure KPA decider's desired counts into runtime calls.

It owns instances (start, probe, drain, stop, adopt after restart) and tells the data
plane which instances are ready. Decisions themselves live in ``domain.autoscale``.
"""
