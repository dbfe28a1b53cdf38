"""The command line: gcloud's `run` surface plus `server`. Commands parse, call, render.

Errors become exit codes in one place (``main``): 2 for bad input, 1 for other failures.
"""
