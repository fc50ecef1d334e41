#!/usr/bin/env bash
# Prints the XLA_FLAGS value that gives command-buffer temporaries stable
# (VMM-reserved) addresses in the installed jaxlib, or nothing. XLA renamed
# this option several times (a boolean va-remapping flag, then an update-mode
# enum whose value names changed); an unknown flag or value aborts start-up,
# so each candidate is tried in a child process.
#   XLA_FLAGS="$(bash scripts/xla_stable_temp_flag.sh)" jax-bq bench e2e ...
for f in --xla_gpu_command_buffer_update_mode=SKIP_TEMP \
  --xla_gpu_command_buffer_update_mode=VMM_PERSISTENT_TEMP \
  --xla_gpu_command_buffer_update_mode=CUSTOM_LIBRARY_UPDATE_FREE \
  --xla_gpu_enable_command_buffer_va_remapping=true; do
  if XLA_FLAGS="$f" timeout 60 python3 -c \
    "import jax, jax.numpy as jnp; jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()" \
    > /dev/null 2>&1; then
    echo "$f"
    exit 0
  fi
done
