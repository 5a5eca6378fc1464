"""The architectures of training.models at test sizes."""

from __future__ import annotations

# (task, arch, data, input side, width multiplier, extras). Trained two steps and exported with
# parity by conftest's tiny_arch_repo, served by tests/service/test_architectures.py.
ARCHS = [
    ("classification", "lenet5", "grey", 32, 1.0, ("embedding", "cam")),
    ("classification", "alexnet", "cls", 64, 0.125, ("embedding", "cam")),
    ("classification", "vgg11", "cls", 32, 0.125, ("embedding", "cam")),
    ("classification", "vgg11_bn", "cls", 32, 0.125, ("embedding", "cam")),
    ("classification", "vgg16", "cls", 32, 0.0625, ("embedding", "cam")),
    ("classification", "vgg16_bn", "cls", 32, 0.0625, ("embedding", "cam")),
    ("classification", "googlenet", "cls", 64, 1.0, ("embedding", "cam")),
    ("classification", "resnet18", "cls", 32, 1.0, ("embedding", "cam")),
    ("classification", "resnet34", "cls", 32, 1.0, ("embedding", "cam")),
    ("classification", "resnet50", "cls", 32, 1.0, ("embedding", "cam")),
    ("classification", "mobilenet_v3_large", "cls", 64, 0.5, ("embedding", "cam")),
    ("segmentation", "fpn_mobilenet_v3_large", "seg", 64, 0.5, ()),
    ("segmentation", "deeplabv3_mobilenet_v3_large", "seg", 64, 0.5, ()),
    ("segmentation", "fcn_resnet50", "seg", 64, 1.0, ()),
    ("segmentation", "deeplabv3_resnet50", "seg", 64, 1.0, ()),
    ("detection", "fasterrcnn_mobilenet_v3_large_320_fpn", "det", 128, 1.0, ()),
    ("instance_segmentation", "centernet_yolact_mobilenet_v3_large", "ins", 64, 0.5, ()),
    ("instance_segmentation", "maskrcnn_mobilenet_v3_large_320_fpn", "ins", 128, 1.0, ()),
    ("keypoints", "centernet_pose_mobilenet_v3_large", "kp", 64, 0.5, ()),
    ("keypoints", "keypointrcnn_mobilenet_v3_large_320_fpn", "kp", 128, 1.0, ()),
]
