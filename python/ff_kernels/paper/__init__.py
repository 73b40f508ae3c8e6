"""The paper's reproduction, built on the library: data sets and negative data (``data``), one
recipe per system of Hinton (2022) (``recipes``), the training loop (``train``), the ``ff-train``
command (``cli``) and the analysis commands (``readout``, ``table1``, ``cifar_iterations``,
``figures``, ``figures_aesop``).

The library (``ff_kernels.functional``, ``ops``, ``nn``, ``distributed`` and ``fftriton``) never
imports this package.
"""
