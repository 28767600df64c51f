"""The application layer: the ``safecode-kernels`` command line, the demo, ``info`` and the
benchmark runner. Nothing below this layer imports from it."""
