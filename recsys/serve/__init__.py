"""``recsys serve``: an online scoring service over an export (HTTP, micro-batched).

* :mod:`recsys.serve.schema`: JSON rows of raw feature values -> checked model inputs;
* :mod:`recsys.serve.batching`: merging concurrent requests into one model call;
* :mod:`recsys.serve.service`: the export loaded for scoring (ranker and two-tower requests);
* :mod:`recsys.serve.app`: the aiohttp application, startup and graceful shutdown.
"""
