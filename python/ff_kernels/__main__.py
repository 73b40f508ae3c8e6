"""``python -m ff_kernels``: the same as the ``ff-train`` command."""

from .cli import main

raise SystemExit(main())
