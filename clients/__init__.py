"""Client side of federated ESSAM: the ClientApp's work.

* :mod:`clients.client` -- serve a probe request: update log, catch-up, exact probes, the reply (no Flower types).
* :mod:`clients.handler` -- the Flower handler (Message and Context in, Message out).
* :mod:`clients.cache` -- the per-process cache: one model copy and the training pool per process.
"""
