"""What a ds_config's ``"optimizer": {"type": "Ember", "params": {...}}`` accepts, checked
before anything is built, with one-line errors that name the fix.

The params are Ember's keyword arguments (``lr``, ``beta2``, ``eps``, ``weight_decay``,
``normalize``, ``body_*``, ...) plus:
- ``betas``: the body optimizer's betas (Ember's table update has only ``beta2``). It is the
  key the Hugging Face Trainer fills in for ``"betas": "auto"``; ``body_betas`` says the same.
- ``tables`` / ``exclude_tables``: shell-style patterns over the model's parameter names that
  add or remove token tables (``"exclude_tables": ["*.wpe.weight"]``).
"""
from __future__ import annotations

import difflib
import inspect
import numbers

NUMBER_KEYS = ("lr", "beta2", "eps", "weight_decay", "body_lr", "body_eps", "body_weight_decay")
PATTERN_KEYS = ("tables", "exclude_tables")
ALIASES = {"betas": "body_betas"}


def ember_config_keys() -> list:
    """The keys a ds_config ``"optimizer": {"type": "Ember", "params": {...}}`` accepts."""
    from .optimizer import Ember
    sig = inspect.signature(Ember.__init__)
    return [k for k in sig.parameters if k not in ("self", "params")] + list(ALIASES)


def is_ember(name) -> bool:
    return isinstance(name, str) and name.lower() == "ember"


def close_optimizer_name(name, known) -> str | None:
    """The known optimizer type ``name`` is most likely a misspelling of, or None."""
    if not isinstance(name, str):
        return None
    lowered = {k.lower(): k for k in known}
    hit = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[hit[0]] if hit else None


def parse_params(params: dict) -> dict:
    """Ember keyword arguments from ds_config params; ValueError (one line) on a bad value."""
    params = dict(params or {})
    valid = ember_config_keys()
    for key in params:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ValueError(f"Unknown Ember optimizer parameter {key!r} in the ds_config; {hint}"
                             f"valid keys: {valid}")
    for key in NUMBER_KEYS:
        if key in params:
            _number(key, params[key])
    for alias, key in ALIASES.items():
        if alias in params:
            value = params.pop(alias)
            if key in params and list(params[key]) != list(value):
                raise ValueError(f"Ember ds_config: {alias!r} and {key!r} both set and differ; "
                                 f"they are the same setting (the body optimizer's betas), keep one")
            params[key] = value
    if "body_betas" in params:
        betas = params["body_betas"]
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ValueError(f"Ember ds_config: betas must be a pair [beta1, beta2] for the body "
                             f"optimizer, got {betas!r}")
        for b in betas:
            _number("betas", b)
    for key in PATTERN_KEYS:
        if isinstance(params.get(key), str):
            params[key] = [params[key]]
    return params


def _number(key, value) -> None:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return
    if value == "auto":
        raise ValueError(f"Ember ds_config: {key!r} is \"auto\", which only the Hugging Face "
                         f"Trainer fills in; outside it give a number (e.g. \"{key}\": 3e-3)")
    raise ValueError(f"Ember ds_config: {key!r} must be a number, got {value!r} "
                     f"({type(value).__name__}); write it without quotes, e.g. \"{key}\": 3e-3")
