"""Pure domain logic: resource models, names, quantities, traffic, autoscaling decisions.

Purely computational: no I/O, no clocks, no randomness. Time and random sources are
passed in as arguments so every decision is testable with exact inputs.
"""
