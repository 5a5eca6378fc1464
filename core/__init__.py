"""convserve's shared leaf: what training, export and serving agree on.

The model contract and reading it from ONNX, ONNX Runtime sessions, image loading,
resize/letterbox geometry, postprocessing, the on-disk dataset formats, metrics, evaluation
and the task table that ties them together. It imports neither torch nor any HTTP stack
(tests/core/test_layering.py checks that), and raises the domain errors of core.errors only:
mapping them to HTTP statuses is service/'s job, exiting the process is a ``main()``'s.
"""

__version__ = "0.2.0"
