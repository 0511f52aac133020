"""PyTorch reference of the training loop: M nets trained one after another.

Each member is written here (torchvision is not needed): a torchvision-layout ResNet with the
ImageNet stem (7x7 stride-2 convolution + 3x3 stride-2 max-pool) or the CIFAR stem (3x3
stride-1, no pool), BasicBlock (ResNet-18/34) or Bottleneck (ResNet-50/101/152, stride on the
3x3 as in torchvision v1.5); ``tiny`` mirrors jaxunlearn's two-stage smoke-test model; ``air-s``
/ ``air-m`` / ``air-l`` mirror `jaxunlearn.models.AirNet` (3x3 convolutions, BatchNorm, GELU
in its tanh form as Flax's default, 2x2 max-pools, global max-pool, bias-free linear head,
logits / 9). Members are trained sequentially, as in the original study: a fresh model and a
fresh optimiser per member, then ``--steps`` timed steps (after one warm-up step per member,
which allocates the optimiser's state and lets cuDNN pick its algorithms: benchmark mode is
on). Optimisers as `jaxunlearn.steps.make_optimizer`: ``adam`` (lr 1e-3, the original's) or
``sgd`` (Nesterov momentum 0.9, lr 0.1, weight decay 5e-4 added to the gradient); the loss is
cross-entropy with ``--label-smoothing``.
Data: one synthetic, already normalised float32 batch ``[batch, 3, 32, 32]`` resident on the
device, in ``--memory-format`` ``channels_last`` (the fast one on CPU and GPU) or ``nchw``.
``--precision bf16`` runs the forward pass under ``torch.autocast(dtype=torch.bfloat16)``;
parameters and the optimiser stay float32. ``--threads`` sets torch's intra-op threads (default:
torch's own choice, one per core).

Throughput is member-images/s = batch / median step time (members run one after another, so
this is also the rate of the whole ensemble). Prints a table, writes JSON with ``--out``:

    python benchmarks/torch_reference.py --model resnet18 --stem imagenet --members 5 \
        --batch 32 --steps 3 --precision fp32 --out benchmarks/results/cpu_torch_reference.json
    python benchmarks/torch_reference.py --model air-s --members 1 --batch 128 --steps 10 \
        --optimizer sgd --label-smoothing 0.2 --memory-format nchw

Needs ``torch`` (``pip install -e '.[torch]'``); `throughput.py --torch` imports this module
and reports "torch not installed" rows when it cannot.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import benchlib


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _bn(planes)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = _bn(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = _bn(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = _bn(planes * 4)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


def _downsample(inplanes: int, outplanes: int, stride: int):
    if stride == 1 and inplanes == outplanes:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, outplanes, 1, stride, bias=False), _bn(outplanes))


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes: int = 10, stem: str = "imagenet",
                 width: int = 64):
        super().__init__()
        if stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), _bn(width),
                                      nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        elif stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), _bn(width),
                                      nn.ReLU())
        else:
            raise ValueError(f"unknown stem {stem!r}; choose imagenet or cifar")
        stages, inplanes = [], width
        for i, blocks in enumerate(layers):
            planes = width * 2**i
            for b in range(blocks):
                stages.append(block(inplanes, planes, 2 if i > 0 and b == 0 else 1))
                inplanes = planes * block.expansion
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # as torchvision
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class AirNet(nn.Module):
    """`jaxunlearn.models.AirNet` in PyTorch (same layers, order and logit scale)."""

    def __init__(self, widths, num_classes: int = 10, logit_scale: float = 1 / 9):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), _bn(widths[0]),
                                  nn.GELU(approximate="tanh"))
        layers, c = [], widths[0]
        for w in widths[1:]:
            layers += [nn.Conv2d(c, w, 3, 1, 1, bias=False), nn.MaxPool2d(2), _bn(w),
                       nn.GELU(approximate="tanh"), nn.Conv2d(w, w, 3, 1, 1, bias=False), _bn(w),
                       nn.GELU(approximate="tanh")]
            c = w
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes, bias=False)
        self.logit_scale = logit_scale
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.body(self.stem(x))
        return self.fc(torch.amax(x, dim=(2, 3))) * self.logit_scale


AIRNETS = {"air-s": (16, 32, 64, 64), "air-m": (32, 64, 128, 128), "air-l": (64, 128, 256, 256)}

ARCHITECTURES = {  # block, blocks per stage, width of the first stage
    "resnet18": (BasicBlock, (2, 2, 2, 2), 64),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 64),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 64),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 64),
    "resnet152": (Bottleneck, (3, 8, 36, 3), 64),
    # jaxunlearn's smoke-test model (two stages, 8 channels), for quick runs of the scripts.
    "tiny": (BasicBlock, (1, 1), 8),
}


MEMORY_FORMATS = {"channels_last": torch.channels_last, "nchw": torch.contiguous_format}


def make_model(name: str, stem: str = "imagenet", num_classes: int = 10) -> nn.Module:
    """A ResNet (``stem`` applies) or an air net (it has no stem) by name."""
    if name in AIRNETS:
        return AirNet(AIRNETS[name], num_classes)
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r} for the torch reference; "
                         f"choose one of {sorted(ARCHITECTURES) + sorted(AIRNETS)}")
    block, layers, width = ARCHITECTURES[name]
    return ResNet(block, layers, num_classes, stem, width)


def count_params(model: nn.Module) -> int:
    """Trainable scalars (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(name: str, params):
    """The optimiser recipes of `jaxunlearn.steps.make_optimizer` at the benchmarks' rates."""
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    raise ValueError(f"unknown optimizer {name!r}; choose adam or sgd")


def measure(arch: str, stem: str, members: int, precision: str, batch: int, steps: int,
            device: torch.device | None = None, optimizer: str = "adam",
            label_smoothing: float = 0.0, memory_format: str = "channels_last",
            threads: int | None = None) -> dict:
    """Trains ``members`` fresh models one after another, ``1 + steps`` steps each; times the
    last ``steps`` of every member. Returns step statistics, the peak memory and the number of
    intra-op threads."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r}; choose fp32 or bf16")
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"unknown memory format {memory_format!r}; choose one of "
                         f"{sorted(MEMORY_FORMATS)}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        return _measure(arch, stem, members, precision, batch, steps, device, optimizer,
                        label_smoothing, memory_format)
    finally:
        torch.set_num_threads(previous)


def _measure(arch, stem, members, precision, batch, steps, device, optimizer, label_smoothing,
             memory_format) -> dict:
    fmt = MEMORY_FORMATS[memory_format]
    device = device or default_device()
    torch.backends.cudnn.benchmark = True
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device, memory_format=fmt)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    first_step_s, times = None, []
    for member in range(members):
        torch.manual_seed(member)
        model = make_model(arch, stem).to(device, memory_format=fmt).train()
        opt = make_optimizer(optimizer, model.parameters())
        for s in range(steps + 1):
            _sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync(device)
            elapsed = time.perf_counter() - t0
            if s == 0:
                first_step_s = elapsed if first_step_s is None else first_step_s
            else:
                times.append(elapsed)
        del model, opt
    if device.type == "cuda":
        peak = {"peak_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_memory": "device"}
        name = torch.cuda.get_device_name(device)
    else:
        peak = {"peak_bytes": benchlib.host_peak_rss_bytes(), "peak_memory": "host RSS"}
        name = "cpu"
    return {"first_step_s": first_step_s, **benchlib.step_stats(times, batch), **peak,
            "torch_threads": torch.get_num_threads(), "memory_format": memory_format,
            "device": {"platform": device.type, "kind": name,
                       "count": torch.cuda.device_count() if device.type == "cuda" else 1}}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18",
                        choices=sorted(ARCHITECTURES) + sorted(AIRNETS))
    parser.add_argument("--stem", default="imagenet", choices=("imagenet", "cifar"))
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per member")
    parser.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--memory-format", default="channels_last", choices=sorted(MEMORY_FORMATS))
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: torch's choice)")
    parser.add_argument("--out", help="JSON file to write")
    args = parser.parse_args(argv)

    row = {"impl": "torch", "model": args.model, "stem": args.stem, "precision": args.precision,
           "members": args.members, "strategy": "sequential", "batch": args.batch,
           "augment": False, "steps": args.steps,
           "params": count_params(make_model(args.model, args.stem))}
    try:
        row.update(measure(args.model, args.stem, args.members, args.precision, args.batch,
                           args.steps, optimizer=args.optimizer,
                           label_smoothing=args.label_smoothing,
                           memory_format=args.memory_format, threads=args.threads), status="ok")
    except Exception as exc:  # OOM or other failure: record it
        row["status"] = benchlib.failure_status(exc)
    print(f"# torch {torch.__version__}: {args.members} x {args.model} ({args.stem} stem), "
          f"one after another, batch {args.batch}, {args.precision}, {args.optimizer}, "
          f"{args.memory_format}, {torch.get_num_threads()} threads")
    ok = row["status"] == "ok"
    print(benchlib.markdown_table(
        ["params", "step s (median, min-max)", "member-img/s (median, min-max)", "first step s",
         "peak GiB", "status"],
        [[f"{row['params']:,}",
          benchlib.fmt_range(row["step_s_median"], row["step_s_min"], row["step_s_max"], 4)
          if ok else "-",
          benchlib.fmt_range(row["member_images_per_s"], row["member_images_per_s_min"],
                             row["member_images_per_s_max"], 0) if ok else "-",
          f"{row['first_step_s']:.2f}" if ok else "-",
          f"{benchlib.fmt_gib(row.get('peak_bytes'))} ({row.get('peak_memory', '-')})",
          row["status"]]]))
    if args.out:
        benchlib.write_record(args.out, {
            "command": benchlib.command_line("torch_reference.py", argv),
            "date": benchlib.utc_now(), "device": row.get("device"),
            "versions": benchlib.versions(), "rows": [row]})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
