"""EchoDiff: diffusion models for echocardiogram images on diffusers and accelerate.

Submodules are imported on use (``from pipelines.networks import build_network``) so that light
commands do not pay for importing every model.
"""
