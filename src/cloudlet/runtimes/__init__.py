"""Runtimes start, stop, throttle and list the containers that back instances.

``base`` holds the interface and its error tree; ``docker`` is the real implementation over
the Docker Engine API; ``fake`` serves tests of the code above this seam.
"""
