"""fastkd: fused, exact knowledge-distillation losses (LDRLD, HCD, DKD, KD) for PyTorch.

``import fastkd`` is light: the losses load on first use (``fastkd.LDRLDLoss``, ``from fastkd
import ldrld_loss``), so that the trainer can check its command line before torch is imported.
The CIFAR nets (resnet8x4, wrn_40_2, ...) are registered in timm once both are imported, in either
order: timm has no plug-in registry for models, so importing timm after fastkd runs
``fastkd.models`` right after it.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# The public API: name -> the submodule that defines it.
_PUBLIC = {
    "DKDLoss": "losses",
    "HCDLogitLoss": "losses",
    "KDLoss": "losses",
    "LDRLDLoss": "losses",
    "dkd_loss": "functional",
    "hcd_logit_loss": "functional",
    "kd_loss": "functional",
    "ldrld_loss": "functional",
    "register_method": "methods",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted({*globals(), *_PUBLIC})


class _RegisterAfterTimm(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports timm with its own loader, then ``fastkd.models`` (which registers the nets)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # once; the other finders locate timm
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self.timm_loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self.timm_loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.timm_loader
        self.timm_loader.exec_module(module)
        importlib.import_module(f"{__name__}.models")


if "timm" in sys.modules:
    importlib.import_module(f"{__name__}.models")
else:
    sys.meta_path.insert(0, _RegisterAfterTimm())
