"""Image classifiers: the CIFAR ResNets of He et al. (2016), and torchvision/timm models by name.

The CIFAR ResNets are written here from the architecture description so that the public
checkpoints of pytorch_resnet_cifar10 (``models/resnet-cifar10/resnet{20,32,44,56}-*.th`` in
the shared data) load as they are: a 3x3 stem of 16 channels, three stages of n basic
blocks with 16, 32 and 64 channels (depth = 6n + 2), the first block of stages 2 and 3
halving the resolution, option-A (parameter-free) shortcuts that subsample by 2 and pad
the new channels with zeros, global average pooling and one linear layer.

An adapter only loads a model and scores: ``preprocess`` turns a decoded RGB image into
the model's input tensor, ``logprobs`` turns a batch of them into float32 log-softmax over
the classes. Data sets and fusion live elsewhere.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from arfuse.adapters.base import ModelInfo, file_sha256
from arfuse.errors import ArfuseError, did_you_mean

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# the statistics pytorch_resnet_cifar10 normalised with (ImageNet's), on inputs scaled to [0, 1]
CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)
IMAGENET_MEAN, IMAGENET_STD = CIFAR_MEAN, CIFAR_STD

# short name -> checkpoint file under the shared data folder
CIFAR_RESNETS = {f"resnet{d}": d for d in (20, 32, 44, 56)}
_CKPT_GLOB = "models/resnet-cifar10/resnet{depth}-*.th"


# ---- the architecture -------------------------------------------------------------------
@dataclass(frozen=True)
class CifarResNetConfig:
    depth: int = 20                 # 6n + 2
    num_classes: int = 10
    widths: tuple[int, int, int] = (16, 32, 64)

    def __post_init__(self):
        if (self.depth - 2) % 6 or self.depth < 8:
            raise ArfuseError(f"CIFAR ResNet depth {self.depth} is not 6n + 2 (20, 32, 44, 56, 110, ...)")

    @property
    def blocks_per_stage(self) -> int:
        return (self.depth - 2) // 6


class _ShortcutA(nn.Module):
    """Option A: subsample by 2 and zero-pad the extra channels (no parameters)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))  # (B, C + 2 pad, H/2, W/2)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = _ShortcutA((c_out - c_in) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images; parameter names match pytorch_resnet_cifar10."""

    def __init__(self, cfg: CifarResNetConfig):
        super().__init__()
        self.cfg = cfg
        w1, w2, w3 = cfg.widths
        n = cfg.blocks_per_stage
        self.conv1 = nn.Conv2d(3, w1, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w1)
        self.layer1 = self._stage(w1, w1, n, 1)
        self.layer2 = self._stage(w1, w2, n, 2)
        self.layer3 = self._stage(w2, w3, n, 2)
        self.linear = nn.Linear(w3, cfg.num_classes)

    @staticmethod
    def _stage(c_in: int, c_out: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(*[BasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))      # (B, 16, 32, 32)
        out = self.layer3(self.layer2(self.layer1(out)))  # (B, 64, 8, 8)
        out = out.mean(dim=(2, 3))                  # (B, 64): global average pool
        return self.linear(out)                     # (B, classes) logits


# ---- the adapter interface --------------------------------------------------------------
class ImageClassifier:
    """A classifier over ``classes``: decoded RGB images -> float32 log-probs per class."""

    info: ModelInfo
    classes: tuple[str, ...]
    device: torch.device = torch.device("cpu")

    def preprocess(self, image) -> torch.Tensor:
        """One PIL image -> the (3, H, W) float32 input tensor the model expects."""
        raise NotImplementedError

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, classes) raw logits."""
        raise NotImplementedError

    @torch.no_grad()
    def logprobs(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 log-softmax over the classes: (B, 3, H, W) -> (B, C)."""
        return torch.log_softmax(self.forward_logits(x.to(self.device)).float(), dim=-1)

    @property
    def num_parameters(self) -> int:
        return self.info.num_parameters


def _to_tensor(image, size: int | None, mean, std) -> tuple[torch.Tensor, bool]:
    """RGB image -> normalised (3, H, W) float32; resized (bilinear) when ``size`` differs."""
    from PIL import Image

    resized = False
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
        resized = True
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3) in [0, 1]
    t = torch.from_numpy(a).permute(2, 0, 1)                        # (3, H, W)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (t - m) / s, resized


class CifarResNetClassifier(ImageClassifier):
    """A CIFAR ResNet from a pytorch_resnet_cifar10 checkpoint (``{'state_dict': {'module.*': ...}}``)."""

    input_size = 32

    def __init__(self, path: str, *, name: str | None = None, device: str = "cpu",
                 classes: tuple[str, ...] = CIFAR10_CLASSES):
        self.path = str(Path(path).resolve())
        state = _read_state_dict(path)
        cfg = _infer_config(state, path)
        if cfg.num_classes != len(classes):
            raise ArfuseError(f"{path} predicts {cfg.num_classes} classes but {len(classes)} class names were given: "
                              "pass one name per output of the model")
        self.model = CifarResNet(cfg)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ArfuseError(f"{path} does not fit a CIFAR ResNet-{cfg.depth}: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}: give a pytorch_resnet_cifar10 checkpoint (3 stages, option-A shortcuts)")
        self.device = torch.device(device)
        self.model.eval().to(self.device)
        self.classes = tuple(classes)
        self.mean, self.std = CIFAR_MEAN, CIFAR_STD
        n_params = sum(p.numel() for p in self.model.parameters())
        self.info = ModelInfo(
            name=name or f"resnet{cfg.depth}", kind="cifar-resnet", num_parameters=n_params,
            vocab_size=cfg.num_classes, max_length=None,
            identity={"format": "pytorch_resnet_cifar10", "path": self.path, "sha256": file_sha256(path),
                      "config": asdict(cfg), "classes": list(self.classes), "input_size": self.input_size,
                      "mean": list(self.mean), "std": list(self.std)})

    def preprocess(self, image) -> torch.Tensor:
        return _to_tensor(image, self.input_size, self.mean, self.std)[0]

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise ArfuseError(f"checkpoint {path} does not exist: check the path, or use one of {', '.join(CIFAR_RESNETS)}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ArfuseError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {e}): "
                          "give a .th/.pt file saved with torch.save") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArfuseError(f"{path} holds no state dict of tensors: save {{'state_dict': model.state_dict()}}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _infer_config(state: dict[str, torch.Tensor], path: str) -> CifarResNetConfig:
    """Depth, classes and widths of a CIFAR ResNet from its parameter names and shapes."""
    blocks = {int(m[1]) for k in state if (m := re.match(r"layer1\.(\d+)\.conv1\.weight$", k))}
    if "linear.weight" not in state or "conv1.weight" not in state or not blocks:
        raise ArfuseError(f"{path} is not a CIFAR ResNet checkpoint (no conv1/layer1/linear weights): "
                          "give a pytorch_resnet_cifar10 checkpoint, or torchvision:NAME / timm:NAME for ImageNet models")
    widths = tuple(int(state[f"layer{i}.0.conv1.weight"].shape[0]) for i in (1, 2, 3))
    return CifarResNetConfig(depth=6 * len(blocks) + 2, num_classes=int(state["linear.weight"].shape[0]),
                             widths=widths)  # type: ignore[arg-type]


# ---- torchvision and timm (optional) ----------------------------------------------------
class HubImageClassifier(ImageClassifier):
    """An ImageNet-style model from torchvision or timm, with its own weights (optional packages)."""

    def __init__(self, source: str, arch: str, *, weights: str | None = None, device: str = "cpu"):
        self.device = torch.device(device)
        if source == "torchvision":
            try:
                import torchvision  # noqa: F401
                from torchvision.models import get_model, get_model_weights
            except ImportError:
                raise ArfuseError(f"model 'torchvision:{arch}' needs the torchvision package, which is not installed: "
                                  "pip install torchvision (a build matching your torch), or use a CIFAR ResNet "
                                  f"({', '.join(CIFAR_RESNETS)})") from None
            if weights is None:
                w = get_model_weights(arch).DEFAULT
                self.model = get_model(arch, weights=w)
                self.classes = tuple(w.meta["categories"])
            else:
                self.model = get_model(arch, weights=None)
                self.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
                self.classes = tuple(str(i) for i in range(_num_outputs(self.model)))
            self.size, self.resize = 224, 256
        elif source == "timm":
            try:
                import timm
            except ImportError:
                raise ArfuseError(f"model 'timm:{arch}' needs the timm package, which is not installed: "
                                  f"pip install timm, or use a CIFAR ResNet ({', '.join(CIFAR_RESNETS)})") from None
            self.model = timm.create_model(arch, pretrained=weights is None,
                                           **({"checkpoint_path": weights} if weights else {}))
            cfg = timm.data.resolve_data_config({}, model=self.model)
            self.size = int(cfg["input_size"][-1])
            self.resize = int(round(self.size / cfg.get("crop_pct", 0.875)))
            self.classes = tuple(str(i) for i in range(_num_outputs(self.model)))
        else:
            raise ArfuseError(f"unknown model source {source!r}: use torchvision:NAME or timm:NAME")
        self.model.eval().to(self.device)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        self.info = ModelInfo(
            name=f"{source}:{arch}", kind=source, num_parameters=sum(p.numel() for p in self.model.parameters()),
            vocab_size=len(self.classes), max_length=None,
            identity={"source": source, "arch": arch, "weights": weights and file_sha256(weights),
                      "size": self.size, "resize": self.resize})

    def preprocess(self, image) -> torch.Tensor:
        from PIL import Image

        # resize the short side, then centre-crop: the usual ImageNet evaluation transform
        w, h = image.size
        s = self.resize / min(w, h)
        image = image.convert("RGB").resize((max(1, round(w * s)), max(1, round(h * s))), Image.BILINEAR)
        w, h = image.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        return _to_tensor(image, None, self.mean, self.std)[0]

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _num_outputs(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return int(last.out_features)


# ---- resolving names --------------------------------------------------------------------
_LOADED: dict[tuple, ImageClassifier] = {}


def cifar_checkpoint(name: str) -> str:
    """The shared-data checkpoint file of ``resnet20`` ... ``resnet56``."""
    from arfuse.paths import shared_data_root

    depth = CIFAR_RESNETS[name.lower()]
    root = shared_data_root()
    hits = sorted(root.glob(_CKPT_GLOB.format(depth=depth))) if root is not None else []
    if not hits:
        raise ArfuseError(f"the {name} checkpoint ({_CKPT_GLOB.format(depth=depth)}) was not found: set ARFUSE_DATA to "
                          "the shared data folder, or pass the path of a pytorch_resnet_cifar10 .th file")
    return str(hits[0])


def is_vision_model(spec: str) -> bool:
    """Whether ``spec`` names an image classifier (so ``arfuse eval`` runs the classification task)."""
    s = spec.strip()
    if s.lower() in CIFAR_RESNETS or s.startswith(("torchvision:", "timm:")):
        return True
    p = Path(s).expanduser()
    return p.suffix in (".th", ".pt", ".pth") and p.is_file()


def load_vision_model(spec: str, *, device: str = "cpu", reuse: bool = True) -> ImageClassifier:
    """An image classifier from a name (``resnet20`` ... ``resnet56``), a CIFAR ResNet checkpoint
    file, or ``torchvision:NAME`` / ``timm:NAME`` (optionally ``...@weights.pth``)."""
    key = (spec, device)
    if reuse and key in _LOADED:
        return _LOADED[key]
    s = spec.strip()
    if s.lower() in CIFAR_RESNETS:
        model: ImageClassifier = CifarResNetClassifier(cifar_checkpoint(s), name=s.lower(), device=device)
    elif s.startswith(("torchvision:", "timm:")):
        source, rest = s.split(":", 1)
        arch, _, weights = rest.partition("@")
        model = HubImageClassifier(source, arch, weights=weights or None, device=device)
    elif Path(s).expanduser().is_file():
        model = CifarResNetClassifier(str(Path(s).expanduser()), name=Path(s).stem, device=device)
    else:
        raise ArfuseError(f"unknown image model {spec!r}: use {', '.join(CIFAR_RESNETS)}, a CIFAR ResNet .th file, "
                          "torchvision:NAME or timm:NAME." + did_you_mean(s.lower(), CIFAR_RESNETS))
    _LOADED[key] = model
    return model
