"""Hostile inputs for ``tests/test_hostile.py``: the corpus (``corpus.py``), built in code, and
the loopback HTTP server that serves its URL cases (``httpd.py``)."""
