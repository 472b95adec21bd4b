"""Zero-code registration: ``"optimizer": {"type": "Ember"}`` works in a script that never
imports ember_ds.

``pip install`` of this project (wheel or editable) puts ``ember_ds-autoload.pth`` into
site-packages; setup.py writes its one line (``pth_line``). At interpreter start-up Python's
``site`` runs it: it puts a finder at the front of ``sys.meta_path`` that answers only for the
name ``deepspeed``. Nothing is imported (not torch, not ember_ds, not this module). A process
that never imports deepspeed pays for compiling that line and one string comparison per module
it imports (``bench/bench_autoload.py`` measures both). When a process imports deepspeed, the
finder runs this file (found without running the ember_ds package's ``__init__``), whose
``find_spec`` takes the finder off ``sys.meta_path``, lets the normal finders load deepspeed
and, as soon as deepspeed's ``__init__`` has run, imports ember_ds, whose import registers
Ember (``ember_ds.register_deepspeed()``). If ember_ds is already being imported (it imports
deepspeed itself) nothing more is done. Any failure in this machinery leaves deepspeed's import
as it would be without the hook.

``EMBER_DS_NO_AUTOLOAD=1`` (read when deepspeed is imported) switches the registration off:
ember_ds is not imported and DeepSpeed's optimizer resolution is untouched. If a ds_config then
names Ember, DeepSpeed's own error ("Ember is not a supported DeepSpeed Optimizer") gets the fix
appended to its message; nothing else changes. The same happens, with the reason and a warning,
if ember_ds fails to import.
"""
import os
import sys

PTH_NAME = "ember_ds-autoload.pth"
OFF_VAR = "EMBER_DS_NO_AUTOLOAD"
RUN_NAME = "ember_ds._autoload(pth)"   # __name__ of this code when the start-up hook runs it
FIX = "add `import ember_ds` before deepspeed.initialize"


def autoload_off() -> bool:
    """True when the environment switches the registration off (any value but 0/false/no)."""
    return os.environ.get(OFF_VAR, "").strip().lower() not in ("", "0", "false", "no")


def find_spec(name):
    """``import deepspeed`` reached the start-up hook (once per process): take the hook off
    ``sys.meta_path``, find deepspeed with the finders after it, and have its loader call
    ``after_deepspeed_import`` once deepspeed's ``__init__`` has run. Never makes the import of
    deepspeed fail: on any surprise it returns None and the import proceeds as without it."""
    sys.meta_path[:] = [f for f in sys.meta_path if not hasattr(f, "ember_ds_hook")]
    try:
        import importlib.util
        spec = importlib.util.find_spec(name)
        loader = spec.loader
        run_init = loader.exec_module
    except Exception:
        return None

    def exec_module(module):
        try:
            run_init(module)
        finally:
            loader.__dict__.pop("exec_module", None)  # the loader's own method again
        try:
            after_deepspeed_import()
        except Exception as exc:  # deepspeed is imported; this must not undo that
            import warnings
            warnings.warn(f"ember_ds autoload hook failed ({type(exc).__name__}: {exc}); "
                          f"{FIX}", RuntimeWarning, stacklevel=2)

    loader.exec_module = exec_module
    return spec


def after_deepspeed_import() -> None:
    """deepspeed's ``__init__`` has run: register Ember, or explain why not."""
    if autoload_off():
        add_error_hint(f"Ember comes from the ember-ds package, whose registration when deepspeed "
                       f"is imported {OFF_VAR}={os.environ.get(OFF_VAR)} switched off: unset "
                       f"{OFF_VAR}, or {FIX}")
        return
    if "ember_ds" in sys.modules:   # ember_ds is importing deepspeed and registers on its own
        return
    try:
        import ember_ds  # noqa: F401  (its import registers Ember with DeepSpeed)
    except Exception as exc:  # deepspeed itself must still import
        why = f"ember_ds failed to import ({type(exc).__name__}: {exc})"
        import warnings
        warnings.warn(f"{why}; a ds_config naming Ember will not work. Set {OFF_VAR}=1 to "
                      f"stop ember-ds registering Ember when deepspeed is imported.",
                      RuntimeWarning, stacklevel=2)
        add_error_hint(f"Ember comes from the ember-ds package, but {why}: fix that, then {FIX}")


def add_error_hint(why: str) -> None:
    """Append ``why`` to DeepSpeed's "Ember is not a supported DeepSpeed Optimizer" (an
    AssertionError from ``DeepSpeedEngine._do_sanity_check``); any other outcome is untouched."""
    try:
        from deepspeed.runtime.engine import DeepSpeedEngine
    except Exception:
        return
    check = DeepSpeedEngine._do_sanity_check
    if getattr(check, "_ember_hint", False):
        return

    def _do_sanity_check(self, *args, **kwargs):
        try:
            return check(self, *args, **kwargs)
        except AssertionError as exc:
            name = self.optimizer_name()
            if isinstance(name, str) and name.lower() == "ember" and "not a supported" in str(exc):
                exc.args = (f"{exc}. {why}.",)
            raise

    _do_sanity_check._ember_hint = True
    _do_sanity_check.__wrapped__ = check
    DeepSpeedEngine._do_sanity_check = _do_sanity_check


# ------------------------------------------------------------ build time (setup.py), tests
# The .pth line. ``site`` compiles and runs it at every start-up (twice in a Python 3.11 venv,
# which processes site-packages' .pth files twice: hence the guard), so it is kept to what
# measured cheapest (bench/bench_autoload.py, valgrind instruction counts): a SimpleNamespace
# (``type(sys.implementation)``, no class to build) whose ``find_spec`` is one lambda, rebuilt
# with globals of its own (a function that keeps ``site``'s globals alive makes interpreter
# shutdown slower). ``_BOOT`` rides along as a string constant, compiled only on
# ``import deepspeed``: it finds this file without importing the ember_ds package, runs it and
# hands over to ``find_spec`` above; if anything fails there, deepspeed imports as if the hook
# were not there.
_BOOT = """\
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not hasattr(f, 'ember_ds_hook')]
try:
    import importlib.util, os
    file = os.path.join(importlib.util.find_spec('ember_ds').submodule_search_locations[0],
                        '_autoload.py')
    with open(file, encoding='utf-8') as f:
        code = compile(f.read(), file, 'exec')
    hook = {'__name__': __name__, '__file__': file}
    exec(code, hook)
    spec = hook['find_spec'](name)
except Exception:
    spec = None
"""
_LINE = ("import sys; 'ember_ds_hook' in str(sys.meta_path) or sys.meta_path.insert(0, "
         "type(sys.implementation)(ember_ds_hook={note!r}, find_spec=type(f := lambda name, *_: "
         "None if name != 'deepspeed' else exec({boot!r}, ns := {{'__name__': {run_name!r}, "
         "'name': name}}) or ns['spec'])(f.__code__, {{'__builtins__': __builtins__}})))\n")


def pth_line() -> str:
    """The single line of ``ember_ds-autoload.pth``."""
    return _LINE.format(boot=_BOOT, run_name=RUN_NAME,
                        note="ember_ds/_autoload.py: registers Ember when deepspeed is imported")
