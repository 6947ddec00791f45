"""``dense``: every neuron (the reference every other method is measured against)."""
from __future__ import annotations

from .method import Method, register


class Dense(Method):
    name, summary = "dense", "all neurons (the reference)"


register(Dense())
