"""Model-level calibration: every selected weight of a pytree, and its profile.

:func:`calibrate_model` runs :func:`jax_bq.calibration.calibrate_tensor` on
every float leaf the :class:`~jax_bq.calibration.CalibrationConfig` selects
and returns a :class:`~jax_bq.profiles.ModelCalibrationProfile`;
:func:`quantize_with_calibration` swaps the leaves for their calibrated
``QuantizedTensor``s, reusing a valid profile from disk.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os

import jax
import numpy as np

from jax_bq import profiles
from jax_bq.calibration import (
    CalibrationConfig,
    CalibrationResult,
    calibrate_tensor,
    checkpoint_hash,
    leaf_name,
)
from jax_bq.formats import FLOAT_DTYPES
from jax_bq.profiles import ModelCalibrationProfile

__all__ = ["calibrate_model", "quantize_with_calibration"]

logger = logging.getLogger("jax_bq")


def _selected(name: str, leaf, config: CalibrationConfig) -> bool:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or np.dtype(dtype) not in FLOAT_DTYPES:
        return False
    shape = getattr(leaf, "shape", ())
    if len(shape) < config.min_rank or len(shape) > 4 or math.prod(shape) < config.min_size:
        return False
    return not any(s in name for s in config.skip)


def calibrate_model(params, config: CalibrationConfig | None = None, model_id: str = ""):
    """Calibrates every selected weight of a pytree (e.g. Flax params).

    Tensors are calibrated in parallel threads (JAX releases the GIL while
    kernels run) with a tqdm progress bar. Leaves are blocked along their
    last axis: Flax ``Dense`` kernels ``[in, out]`` are therefore blocked
    along the output features; transpose to ``[out, in]`` first for the
    ``[N, K]`` layout that ``qmatmul`` reads.

    Returns:
        A :class:`jax_bq.profiles.ModelCalibrationProfile`.
    """
    config = config or CalibrationConfig()
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    todo = [(leaf_name(p), leaf) for p, leaf in leaves if _selected(leaf_name(p), leaf, config)]
    workers = config.max_workers or min(8, os.cpu_count() or 1)
    results: dict[str, CalibrationResult] = {}
    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"calibrate {config.format.value}", unit="tensor")
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(calibrate_tensor, leaf, config, name): name for name, leaf in todo}
        for fut in concurrent.futures.as_completed(futures):
            r = fut.result()
            results[r.name] = r
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    results = {name: results[name] for name, _ in todo}  # tree order
    return ModelCalibrationProfile.create(
        model_id=model_id,
        config=config,
        results=results,
        checkpoint=checkpoint_hash(params),
    )


def quantize_with_calibration(
    params,
    config: CalibrationConfig | None = None,
    profile_path: str | os.PathLike | None = None,
    model_id: str = "",
):
    """Returns ``(params with calibrated QuantizedTensors, profile)``.

    With ``profile_path``, a valid profile for these exact weights and this
    config is loaded instead of recalibrating; a missing, corrupt, outdated or
    mismatched profile is logged with its reason, recalibrated and rewritten
    (atomically).
    """
    config = config or CalibrationConfig()
    profile = None
    if profile_path is not None and os.path.exists(profile_path):
        ok, why = profiles.profile_valid(profile_path, params=params, config=config)
        if ok:
            profile = profiles.load_profile(profile_path, params=params, config=config)
        else:
            logger.warning("jax_bq: recalibrating: %s", why)
    if profile is None:
        profile = calibrate_model(params, config, model_id=model_id)
        if profile_path is not None:
            profiles.save_profile(profile, profile_path)
    by_name = profile.results
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = [by_name[leaf_name(p)].quantized if leaf_name(p) in by_name else v for p, v in leaves]
    return jax.tree_util.tree_unflatten(treedef, out), profile
