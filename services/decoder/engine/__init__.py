"""The decoder engine: a pure-Python scheduler and block manager, and the torch side that runs them.

``request``, ``sampling_params``, ``block_manager`` and ``scheduler`` never import torch; the model
runner, sampler and workers own every tensor.
"""
