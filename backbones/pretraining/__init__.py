"""ImageNet-style classification pretraining of the ResNet backbones (the paper's section 3.4)."""
