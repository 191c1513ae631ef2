"""The HTTP face of the backend: the Flask app (:mod:`backend.web.app`), who may call what
(:mod:`backend.web.auth`) and bounded JSON bodies (:mod:`backend.web.jsonbody`).

May import modes, bulk.request, queue.client (its errors), ls and the foundation modules; never
torch. Nothing imports web except the entry points (``_wsgi.py``, :mod:`backend.cli`).
"""
