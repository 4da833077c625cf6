"""Optional CPU speedups: C kernels for fp32 work, with their loaders (ctypes), build cache and
self-tests, and process settings.

``*.c`` files of this package are the sources (package data, read at build time by
:func:`pipeline.kernels.build.read_source`); each Python module next to one wraps it:

- :mod:`pipeline.kernels.build`: compiler and flags, probe, on-disk cache, self-test gate,
  :func:`~pipeline.kernels.build.build_failures` (the machinery every kernel builds through);
- :mod:`pipeline.kernels.winograd` (``winograd.c``): Winograd F(4x4, 3x3) convolutions and
  :func:`~pipeline.kernels.winograd.enable_winograd`, which installs them into a model;
- :mod:`pipeline.kernels.decode` (``decode.c``): one-token decoding linears and attention;
  :func:`~pipeline.kernels.decode.install` makes them the decoder's ``"native"`` kernel set;
- :mod:`pipeline.kernels.perf`: glibc allocator thresholds for a worker process (no C source).

:mod:`pipeline.models` never imports this package: models are plain torch and expose slots
(``ResnetBlock.fast_forward``, :func:`pipeline.models.decode.set_native_kernels`) that these
modules fill when a caller applies them. Importing any of them builds nothing.
"""
