"""Backends behind one interface: loaders build models lazily, runners score uint8 batches.

Polygraphy's pattern: a runner is a context manager; ``activate()`` loads,
``infer(images_u8) -> scores`` runs, ``deactivate()`` frees. Backends only
implement ``activate_impl/infer_impl/deactivate_impl``. Heavy backends
(onnxruntime, TensorRT) are imported lazily by their own modules.

Modules: ``base`` (the template), ``torch_runner`` (reference),
``onnxruntime_runner``, ``tensorrt_runner`` + ``tensorrt_builder``,
``registry`` (``make_runner`` / ``describe_choice``: which backend and
precision serve a bundle) and ``comparator`` (``compare_runners``).
"""
