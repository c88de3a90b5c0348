"""KOA-Serve training: data layouts and splits, fitting, metrics, evaluation, comparison, export.

Stands on `model/`; never imports `handler/`.
"""
