"""Faster R-CNN on resdet's ResNets, the paper's COCO / VOC detection entry, and (``localization/``) its
ImageNet localization entry.

``modeling/`` the detector, one concept per file (``build.py`` assembles it; ``postprocessing.py`` maps its
boxes back to the image files' pixels); ``data/`` datasets and the table of formats; ``evaluation/``
evaluators and the evaluation loop; ``engine.py`` the training run over ``backbones.engine.Trainer``;
``predictor.py`` and ``export.py`` inference and the deployable graph. Builds on ``backbones``;
``backbones`` never imports it.
"""
