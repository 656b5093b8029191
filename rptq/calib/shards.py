"""Calibration windows split across devices: one contiguous shard per device, merged exactly.

The runner holds one decoder layer at a time, so placing layers on different GPUs (accelerate's
device map) would leave all but one GPU idle at every moment: several devices buy speed only by
sharing the windows. Each device holds a copy of the current layer and a contiguous run of
windows, runs its windows through each pass in its own thread (torch releases the GIL inside
kernels, so CUDA devices overlap), and what its taps saw is merged so that the plan is the one
a single device gives:

- channel min/max (the clustering points): min/max of the shards' extremes, exact;
- per-cluster ranges: each window's cluster extremes are recorded on its device and replayed
  into one observer in global window order, so even the order-dependent ema_minmax is exact;
- GPTQ Hessians: the shards' running means combined by token count in shard order, equal to
  one device's up to float rounding (the sums are grouped differently);
- output pass: each device advances its own windows, which the next layer starts from.

With one device, each pass is the plain loop over windows: no thread, no copy, no replay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from rptq.calib.gptq import HessianTap
from rptq.calib.observers import ChannelRangeObserver, ClusterRangeObserver
from rptq.errors import ConfigError
from rptq.model.forward import LayerWeights, Tap, decoder_layer
from rptq.model.shape import OptShape
from rptq.points import Act

DEVICE_FORMS = "use cpu, cuda, cuda:N, a comma-separated list such as cuda:0,cuda:1, or cuda:all"

Result = TypeVar("Result")


def parse_devices(spec: str | Sequence[str | torch.device]) -> list[torch.device]:
    """The calibration devices from `cpu`, `cuda`, `cuda:1`, a comma-separated list or `cuda:all`.

    Checked before any model is read, each failure a one-line ConfigError with the fix. A device
    may repeat: `cpu,cpu` shards the windows on one device, no faster, but it runs the merge.
    """
    names = spec.split(",") if isinstance(spec, str) else [str(device) for device in spec]
    names = [name.strip() for name in names]
    if names == ["cuda:all"]:
        return [torch.device("cuda", index) for index in range(_cuda_count("cuda:all"))]
    return [_device(name) for name in names]


def _device(name: str) -> torch.device:
    if name == "cuda:all":
        raise ConfigError("--device cuda:all stands alone; to pick GPUs list them: cuda:0,cuda:1")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; {DEVICE_FORMS}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"--device {name}: calibration runs on cpu or cuda; {DEVICE_FORMS}")
    count = _cuda_count(name)
    if device.index is not None and device.index >= count:
        plural = "s" if count != 1 else ""
        raise ConfigError(
            f"{name} is not available: this machine has {count} CUDA device{plural}; "
            f"use cuda:0 to cuda:{count - 1}, or cuda:all"
        )
    return device


def _cuda_count(name: str) -> int:
    if not torch.backends.cuda.is_built():
        raise ConfigError(
            f"--device {name} needs a CUDA build of torch (this one is CPU-only): "
            "install torch with CUDA (pytorch.org), or use --device cpu"
        )
    count = torch.cuda.device_count()
    if count == 0:
        raise ConfigError(
            f"--device {name}: no CUDA device is visible (check the driver and "
            "CUDA_VISIBLE_DEVICES), or use --device cpu"
        )
    return count


@dataclass
class Shard:
    """One device's contiguous run of windows [n, T, d] and the causal mask, on that device."""

    device: torch.device
    hidden: torch.Tensor
    additive: torch.Tensor

    def run(self, weights: LayerWeights, shape: OptShape, tap: Tap) -> None:
        """Each window through the layer on its own (the weights copied here if elsewhere)."""
        weights = {name: tensor.to(self.device) for name, tensor in weights.items()}
        for n in range(self.hidden.shape[0]):
            decoder_layer(self.hidden[n : n + 1], weights, self.additive, shape, tap)

    def advance(self, weights: LayerWeights, shape: OptShape, tap: Tap) -> None:
        """Replace each window by the layer's output: the next layer's inputs."""
        weights = {name: tensor.to(self.device) for name, tensor in weights.items()}
        for n in range(self.hidden.shape[0]):
            self.hidden[n : n + 1] = decoder_layer(
                self.hidden[n : n + 1], weights, self.additive, shape, tap
            )


def split_windows(
    hidden: torch.Tensor, additive: torch.Tensor, devices: Sequence[torch.device]
) -> list[Shard]:
    """Contiguous runs of windows [N, T, d], sizes as even as possible, first run on devices[0].

    Devices beyond the window count get no shard.
    """
    parts = torch.tensor_split(hidden, min(len(devices), hidden.shape[0]))
    return [
        Shard(device, part.to(device), additive.to(device))
        for device, part in zip(devices, parts, strict=False)
    ]


def on_each(shards: Sequence[Shard], work: Callable[[Shard], Result]) -> list[Result]:
    """work(shard) for every shard, results in shard order; one thread per shard if several."""
    if len(shards) == 1:
        return [work(shards[0])]

    def in_thread(shard: Shard) -> Result:
        # grad mode and the current CUDA device are per thread
        on_device = (
            torch.cuda.device(shard.device)
            if shard.device.type == "cuda"
            else contextlib.nullcontext()
        )
        with torch.no_grad(), on_device:
            return work(shard)

    with ThreadPoolExecutor(max_workers=len(shards)) as pool:
        return list(pool.map(in_thread, shards))


def channel_ranges(
    shards: Sequence[Shard], weights: LayerWeights, shape: OptShape, acts: set[Act]
) -> ChannelRangeObserver:
    """Statistics pass: global per-channel extremes over every shard's windows."""

    def work(shard: Shard) -> ChannelRangeObserver:
        observer = ChannelRangeObserver(acts)
        shard.run(weights, shape, observer)
        return observer

    merged, *others = on_each(shards, work)
    for other in others:
        merged.merge(other)
    return merged


def cluster_ranges(
    shards: Sequence[Shard],
    weights: LayerWeights,
    shape: OptShape,
    observer: ClusterRangeObserver,
    hessians: HessianTap | None,
) -> None:
    """Activation pass: fills `observer` and `hessians` as one device over every window would."""
    if len(shards) == 1:
        shards[0].run(weights, shape, _both(observer, hessians))
        return

    def work(shard: Shard) -> tuple[WindowLog, HessianTap | None]:
        log = WindowLog(observer)
        tap = None if hessians is None else HessianTap(hessians.acts)
        shard.run(weights, shape, _both(log, tap))
        return log, tap

    for log, tap in on_each(shards, work):  # shard order is window order
        log.replay(shards[0].device)
        if hessians is not None and tap is not None:
            hessians.merge(tap)


def advance(shards: Sequence[Shard], weights: LayerWeights, shape: OptShape, tap: Tap) -> None:
    """Output pass: every shard's windows through the fake-quantized layer, in place."""
    on_each(shards, lambda shard: shard.advance(weights, shape, tap))


class WindowLog:
    """A tap recording each window's cluster extremes in order, to replay on one device later.

    It only uses the observer's clusters while the shards run (threads); `replay` updates it.
    """

    def __init__(self, observer: ClusterRangeObserver) -> None:
        self.observer = observer
        self.extremes: list[tuple[Act, torch.Tensor, torch.Tensor]] = []

    def __call__(self, act: Act, x: torch.Tensor) -> torch.Tensor:
        """Keep this window's cluster extremes of `act` for the merge across devices."""
        extremes = self.observer.cluster_extremes(act, x)
        if extremes is not None:
            self.extremes.append((act, *extremes))
        return x

    def replay(self, device: torch.device) -> None:
        """Feed the recorded windows to the observer, in the order they ran."""
        for act, cmin, cmax in self.extremes:
            self.observer.update(act, cmin.to(device), cmax.to(device))


def _both(first: Tap, second: Tap | None) -> Tap:
    """Two observing taps in turn (each sees the float activation and returns it)."""
    if second is None:
        return first
    return lambda act, x: second(act, first(act, x))
