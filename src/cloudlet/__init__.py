"""Cloudlet: Cloud Run on your own machine.

Layers (inner to outer): ``domain`` (pure), ``store`` (SQLite), ``runtimes`` (containers),
``dataplane`` (router/activator), ``autoscaler``, ``controlplane`` (API), ``cli``.
"""

__version__ = "0.1.0"
