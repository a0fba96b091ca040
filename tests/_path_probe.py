"""Probe of the optional CUDA kernel paths for the GPU tests: a tiny call with the path forced through its
environment variable (RFSR_FWD_PATH, RFSR_BWD_PATH). The op raises when a forced path is not in the build or not
supported by the device."""
from __future__ import annotations

import os
from typing import Callable


def runs_with_env(name: str, value: str, call: Callable[[], object]) -> bool:
    """Whether call() succeeds while the environment variable `name` is `value` (its old value is restored)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        call()
        return True
    except (RuntimeError, ValueError):
        return False
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old
