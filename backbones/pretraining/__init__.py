"""ImageNet-style classification pretraining of the ResNet backbones (the paper's section 3.4).

``config.py`` its schema, ``data.py`` its datasets and transforms, ``synthetic.py`` the demo's shapes
folder, ``evaluate.py`` centre / 10-crop / multi-scale testing, ``trainer.py`` the task on the shared
trainer. Imports ``backbones`` (the ResNets, ``imagedata``, ``engine``); no other application imports it."""
