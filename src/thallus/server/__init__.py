"""The reference service (``pip install "thallus[server]"``): the FastAPI API, identity, storage,
the audit store and writer, and ``thallus serve``.

It builds on the layers (:mod:`thallus`) and nothing of it is imported by them:
``tests/test_packaging.py`` checks that importing the layers loads none of its dependencies.
"""
