"""Registering Ember with DeepSpeed.

DeepSpeed resolves ``"optimizer": {"type": NAME}`` against its built-ins and then torch.optim,
with no plugin hook, and refuses optimizers outside ZERO_SUPPORTED_OPTIMIZERS under ZeRO. So
registration patches three engine methods, each delegating to DeepSpeed's own for any other
optimizer:
- ``_is_supported_optimizer``: "Ember" (any case) is a supported name;
- ``_configure_basic_optimizer``: builds Ember from the ds_config params (unknown keys are an
  error listing the valid ones) and finds untagged nn.Embedding / VocabParallelEmbedding
  tables in ``engine.module``, since DeepSpeed hands the optimizer only parameters;
- ``_configure_optimizer``: after DeepSpeed wraps the optimizer (ZeRO, bf16), tells Ember how
  the wrapper laid the tables out (``Ember.attach_deepspeed``); it also covers an Ember
  instance or factory passed as ``deepspeed.initialize(optimizer=...)``.
"""
from __future__ import annotations

import functools
import importlib
import inspect

from .optimizer import _WRAPPER_INIT_DEPTH, Ember
from .tables import tag_module_tables

_REGISTERED = [False]


def ember_config_keys() -> list:
    """The keys a ds_config ``"optimizer": {"type": "Ember", "params": {...}}`` accepts."""
    sig = inspect.signature(Ember.__init__)
    return [k for k in sig.parameters if k not in ("self", "params")]


def build_from_config(model_parameters, module, params: dict) -> Ember:
    """Ember from ds_config params, tables found in ``module`` as well as by tags."""
    valid = ember_config_keys()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"Unknown Ember optimizer parameter(s) {unknown} in the ds_config; "
                         f"valid keys: {valid}")
    if module is not None:
        tag_module_tables(module)
    return Ember(model_parameters, **params)


def register_deepspeed() -> bool:
    """Make ``"optimizer": {"type": "Ember"}`` work in DeepSpeed ds_configs, and let ZeRO use
    Ember without ``zero_allow_untested_optimizer``. Idempotent; ``import ember_ds`` calls it.
    Returns False when DeepSpeed is not installed."""
    if _REGISTERED[0]:
        return True
    try:
        from deepspeed.runtime import engine as ds_engine
        from deepspeed.runtime.zero import utils as zero_utils
    except ImportError:
        return False
    Engine = ds_engine.DeepSpeedEngine

    if Ember not in zero_utils.ZERO_SUPPORTED_OPTIMIZERS:
        zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(Ember)

    orig_supported = Engine._is_supported_optimizer

    @functools.wraps(orig_supported)
    def _is_supported_optimizer(self, optimizer_name):
        return _is_ember(optimizer_name) or orig_supported(self, optimizer_name)

    orig_basic = Engine._configure_basic_optimizer

    @functools.wraps(orig_basic)
    def _configure_basic_optimizer(self, model_parameters):
        if not _is_ember(self.optimizer_name()):
            return orig_basic(self, model_parameters)
        return build_from_config(model_parameters, self.module, dict(self.optimizer_params() or {}))

    orig_configure = Engine._configure_optimizer

    @functools.wraps(orig_configure)
    def _configure_optimizer(self, client_optimizer, model_parameters):
        _WRAPPER_INIT_DEPTH[0] += 1
        try:
            result = orig_configure(self, client_optimizer, model_parameters)
        finally:
            _WRAPPER_INIT_DEPTH[0] -= 1
        if isinstance(self.basic_optimizer, Ember):
            self.basic_optimizer.attach_deepspeed(self.optimizer)
        return result

    Engine._is_supported_optimizer = _is_supported_optimizer
    Engine._configure_basic_optimizer = _configure_basic_optimizer
    Engine._configure_optimizer = _configure_optimizer
    _REGISTERED[0] = True
    return True


def disable_cpu_shm_build() -> None:
    """Skip the shared-memory communication op that ``deepspeed.initialize`` JIT-compiles with
    g++ on CPU (about 42 s on a fresh machine); gloo collectives are used instead. For CPU runs
    and tests; harmless on GPU (the op is CPU-only)."""
    try:
        mod = importlib.import_module("deepspeed.comm.torch")
    except ImportError:
        return
    if hasattr(mod, "build_shm_op"):
        mod.build_shm_op = lambda *a, **k: None


def _is_ember(name) -> bool:
    return isinstance(name, str) and name.lower() == "ember"
