"""``python -m ff_kernels``: the same as the ``ff-train`` command (:mod:`ff_kernels.paper.cli`)."""

from .paper.cli import main

raise SystemExit(main())
