"""Server side of federated ESSAM on Flower's Message API.

* :mod:`strategies.essam` -- :class:`~strategies.essam.ESSAMStrategy` (one round = one step = an
  ascent and a descent exchange) and its settings.
* :mod:`strategies.aggregation` -- pure per-seed aggregation (weighted mean, median, trimmed mean).
* :mod:`strategies.wire` -- measured bytes of a message (Flower's own serialization).
* :mod:`strategies.local_grid` -- an in-process Grid (tests, ``federation.backend=local``).

Nothing is imported here, so the pure modules load without Flower.
"""
