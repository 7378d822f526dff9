"""``internvl-mesh verify``: the fidelity checks of the test suite, run on a real checkpoint.

The suite proves fidelity on tiny random checkpoints; an operator with a real checkpoint on real
hardware runs the same three comparisons through the production code:

1. ``tiles``: our tiling (``services.preprocess``, then the encoder's normalisation) against the
   reference ``load_image`` (``services.demo.reference``), bit for bit;
2. ``embeddings``: the encoder core's embeddings against transformers'
   ``InternVLModel.get_image_features`` on the reference pixel values;
3. ``tokens``: greedy tokens of the decoder (``DecoderCore`` behind ``DecoderFrontend``) against
   ``InternVLForConditionalGeneration.generate``, one request at a time.

The images are built in code (gradients, checkerboards, shapes; several sizes and aspect ratios, so
several tile grids occur). Tolerances depend on the dtype and device (``options.Tolerances``).
``verify.run.verify`` runs everything and returns a ``report.Report``; ``verify.cli`` prints it.
"""
