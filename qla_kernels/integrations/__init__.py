"""Where users already are: Hugging Face transformers (`quant_method: "qla"`) and PEFT task LoRAs.

`import qla_kernels` registers the "qla" quantization method with transformers. transformers has
no entry-point discovery and is slow to import (about 1.5 s for its quantizers), so the
registration runs when `transformers.quantizers.auto` is imported, or at once when it already
is: a process that imports qla_kernels can `AutoModel*.from_pretrained` a qla directory whether it
imported transformers before or after. A process that never imports qla_kernels loads such a
directory unquantized (transformers only logs a warning): `load_pretrained` refuses to.
"""

from __future__ import annotations

import importlib.abc
import sys

_TRIGGER = "transformers.quantizers.auto"


def _register() -> None:
    """Runs inside transformers' own import: a failure here must not break transformers."""
    import warnings

    try:
        from transformers import __version__ as version

        if int(version.split(".")[0]) < 5:
            warnings.warn(f"qla_kernels' save_pretrained / from_pretrained integration needs transformers >= 5 "
                          f"(found {version}): not registered")
            return
        from . import transformers as hf

        hf.register()
    except Exception as error:  # noqa: BLE001  (whatever it is, transformers' import must go on)
        warnings.warn(f"qla_kernels could not register with transformers ({type(error).__name__}: {error})")


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds `_TRIGGER` with the other finders and registers once its module has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TRIGGER:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        uninstall()
        _register()


_FINDER = _RegisterAfterImport()


def install() -> None:
    """Registers with transformers now if its quantizers are imported, else when they are."""
    if _TRIGGER in sys.modules:
        _register()
    elif _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def load_pretrained(path: str, model_class=None, runtime_form: bool = True, **kwargs):
    """A qla model saved with `save_pretrained`, loaded with `model_class.from_pretrained(path,
    **kwargs)` (default: the class config.json names), refusing to return it unquantized (a
    directory that is not a qla model, or a load that did not rebuild its QuantLinears):
    ValueError. `runtime_form=False`: the calibration form. See integrations/transformers.py."""
    from .transformers import load_pretrained as load

    return load(path, model_class, runtime_form, **kwargs)
