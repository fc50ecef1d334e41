"""``python -m jax_bq`` runs the ``jax-bq`` command line."""

import sys

from jax_bq.cli import main

sys.exit(main())
