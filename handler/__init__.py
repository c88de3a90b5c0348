"""KOA-Serve's TorchServe handler (`handler.koa_handler`), its request path and attributions.

Stands on `model/`; never imports `train/`.
"""
