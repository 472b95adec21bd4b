"""Registering Ember with DeepSpeed.

DeepSpeed resolves ``"optimizer": {"type": NAME}`` against its built-ins and then torch.optim,
with no plugin hook, and refuses optimizers outside ZERO_SUPPORTED_OPTIMIZERS under ZeRO. So
registration patches three engine methods, each delegating to DeepSpeed's own for any other
optimizer:
- ``_is_supported_optimizer``: "Ember" (any case) is a supported name;
- ``_is_supported_optimizer``: also turns a misspelled type ("Embr") into a one-line error
  naming the close one, instead of DeepSpeed's bare "not a supported DeepSpeed Optimizer";
- ``_configure_basic_optimizer``: builds Ember from the ds_config params (checked by
  ember_ds.ds_config) and finds the token tables in ``engine.module`` (ember_ds.tables'
  rules), since DeepSpeed hands the optimizer only parameters;
- ``_configure_optimizer``: after DeepSpeed wraps the optimizer (ZeRO, bf16), tells Ember how
  the wrapper laid the tables out (``Ember.attach_deepspeed``); it also covers an Ember
  instance or factory passed as ``deepspeed.initialize(optimizer=...)``. Rank 0 then prints
  which parameters Ember factors.
"""
from __future__ import annotations

import functools
import importlib

from .ds_config import close_optimizer_name, ember_config_keys, is_ember, parse_params  # noqa: F401
from .optimizer import _WRAPPER_INIT_DEPTH, Ember
from .tables import tag_module_tables

_REGISTERED = [False]


def build_from_config(model_parameters, module, params: dict) -> Ember:
    """Ember from ds_config params, tables found in ``module`` (the rules of ember_ds.tables,
    with the params' ``tables`` / ``exclude_tables`` patterns) as well as by tags."""
    kwargs = parse_params(params)
    include, exclude = kwargs.pop("tables", None), kwargs.pop("exclude_tables", None)
    if module is not None:
        tag_module_tables(module, include or (), exclude or ())
    elif include or exclude:
        raise ValueError("Ember ds_config: tables / exclude_tables need the model "
                         "(deepspeed.initialize(model=...))")
    return Ember(model_parameters, **kwargs)


def print_summary(engine) -> None:
    """Rank 0 prints which parameters Ember factors and what the body optimizer gets; under
    pipeline parallelism the first rank of each stage prints its stage's."""
    import torch.distributed as dist
    grid = getattr(engine, "grid", None) or getattr(getattr(engine, "module", None), "_grid", None)
    stage = ""
    if grid is not None and getattr(grid, "pipe_parallel_size", 1) > 1:
        if grid.get_data_parallel_id() != 0 or grid.get_slice_parallel_rank() != 0:
            return
        stage = f"pipeline stage {grid.get_stage_id()}: "
    elif dist.is_initialized() and dist.get_rank() != 0:
        return
    opt = engine.basic_optimizer
    zero = engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else 0
    dp = getattr(engine, "dp_world_size", 1) or 1
    print(stage + opt.summary(zero_stage=zero, dp_size=dp), flush=True)


def _check_client_tables(opt: Ember, module) -> None:
    """An Ember built from untagged tensors factors nothing; when the engine's model has token
    tables, that is a mistake to stop on, not a run of AdamW under Ember's name."""
    if opt.token_tables or module is None:
        return
    tables = {id(p) for p in tag_module_tables(module)}
    found = [n for n, p in module.named_parameters() if id(p) in tables]
    if found:
        raise ValueError(f"Ember was built from untagged parameters and factors no table, but "
                         f"the model has token tables ({', '.join(found[:3])}): build it with "
                         f"Ember(model), or name Ember in the ds_config")


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
        if is_ember(optimizer_name) or orig_supported(self, optimizer_name):
            return True
        near = close_optimizer_name(optimizer_name, _known_optimizer_types())
        if near is not None:
            raise ValueError(f"ds_config optimizer type {optimizer_name!r} is not known; did "
                             f"you mean {near!r}?")
        return False

    orig_basic = Engine._configure_basic_optimizer

    @functools.wraps(orig_basic)
    def _configure_basic_optimizer(self, model_parameters):
        if not is_ember(self.optimizer_name()):
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
            _check_client_tables(self.basic_optimizer, self.module)
            self.basic_optimizer.attach_deepspeed(self.optimizer)
            print_summary(self)
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


def _known_optimizer_types() -> list:
    """Every optimizer type a ds_config may name: DeepSpeed's, torch.optim's and Ember."""
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS
    torch_names = [n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
                   and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)]
    return list(DEEPSPEED_OPTIMIZERS) + torch_names + ["Ember"]
