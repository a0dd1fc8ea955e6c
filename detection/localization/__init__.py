"""ImageNet localization with a per-class RPN and an optional R-CNN stage (appendix C of He et al. 2016).

Dependencies go one way: this package imports ``backbones`` and ``detection.modeling``; nothing in
``backbones`` imports it.
"""
