"""The ``jax-bq`` subcommands, one module each; :mod:`jax_bq.cli` registers them."""
