"""munba-diffusion: MUNBa (Machine Unlearning via Nash Bargaining) for diffusers.

The bargaining core lives in :mod:`munba_diffusion.bargaining` and :mod:`munba_diffusion.step`; concept erasure
for Stable Diffusion in :mod:`munba_diffusion.diffusion`; classifier and CLIP unlearning in
:mod:`munba_diffusion.classifiers`; evaluators in :mod:`munba_diffusion.evaluation`; the bundled demo world in
:mod:`munba_diffusion.demo`. ``MunbaPipeline`` is the custom diffusers pipeline (``pipelines/munba.py``),
``MunbaXLPipeline`` its Stable Diffusion XL twin (``pipelines/munba_xl.py``), ``MunbaSD3Pipeline`` and
``MunbaFluxPipeline`` those of SD3 and FLUX.1 (``pipelines/munba_sd3.py``, ``pipelines/munba_flux.py``).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["MunbaFluxPipeline", "MunbaPipeline", "MunbaSD3Pipeline", "MunbaXLPipeline", "__version__"]


def __getattr__(name: str):
    # Imported lazily: the pipeline pulls in diffusers and transformers, which the classifier tools do not need.
    if name == "MunbaPipeline":
        from .pipelines.munba import MunbaPipeline  # noqa: PLC0415 lazy attribute: keeps `import munba_diffusion` light

        return MunbaPipeline
    if name == "MunbaXLPipeline":
        from .pipelines.munba_xl import MunbaXLPipeline  # noqa: PLC0415 lazy attribute, as above

        return MunbaXLPipeline
    if name == "MunbaSD3Pipeline":
        from .pipelines.munba_sd3 import MunbaSD3Pipeline  # noqa: PLC0415 lazy attribute, as above

        return MunbaSD3Pipeline
    if name == "MunbaFluxPipeline":
        from .pipelines.munba_flux import MunbaFluxPipeline  # noqa: PLC0415 lazy attribute, as above

        return MunbaFluxPipeline
    raise AttributeError(f"module 'munba_diffusion' has no attribute {name!r}")
