"""Composition: the whole mesh put together from its parts.

``mesh`` is the one package that imports both ``services`` (preprocess, encoder, decoder and what they
share) and ``gateway``: the mesh config and the Ray Serve config rendered from it (``topology``), the
local ``serve`` command (``serve``), the services started alone as gRPC servers (``standalone``), and the
``internvl-mesh`` command line (``cli``, ``ops_cli``). Neither ``services`` nor ``gateway`` imports it.
"""
