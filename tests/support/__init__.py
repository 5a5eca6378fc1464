"""Shared test code (not fixtures: those live in tests/conftest.py).

- ``servers``: the repository's paths and a real ``bentoml serve`` started and stopped;
- ``archs``: the architectures trained at test sizes;
- ``http``: a small HTTP client on the standard library and the one multipart builder;
- ``images``: synthetic request images with known content and the one IoU helper.
"""
