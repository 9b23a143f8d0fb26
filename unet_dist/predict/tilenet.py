"""The predictor's model side: batches of raw tiles in, stored probabilities and masks out.

On a GPU the host-device traffic is what a fast model waits on, so it is kept small and off the
compute stream:

- tiles travel as the raw dtype (uint8 for EM: a quarter of float32's bytes) from pinned host
  buffers, and become [0, 1] floats on the device through a lookup table built on the host exactly
  as `to_unit_float` computes them (so the model sees the same numbers on any device);
- results come back cropped to the block, as the stored dtypes: uint8 round(255 p) (or float16)
  and the uint8 mask, quantized on the device with numpy's rounding (half to even), 2 bytes per
  voxel instead of 4 (an affinity model, `channels`: every channel's round(255 a), no mask);
- copies run on their own stream: batch k+1 goes up while batch k computes, and batch k comes back
  while k+1 computes (`submit` returns at once; `Pending.result()` waits).

On the CPU the same functions run in order with no pinned memory or streams, and give the numbers
the host-side pipeline gave, bit for bit (tests/test_io_path.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from unet_dist import runtime
from unet_dist.data.patches import to_unit_float


def _dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, k, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def _undo(y: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    y = torch.flip(y, dims=(-1,)) if flip else y
    return torch.rot90(y, -k, dims=(-2, -1))


def tta_average(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The mean of fn over the 8 flips/rotations of the (y, x) plane, each mapped back."""
    total = None
    for k in range(4):
        for flip in (False, True):
            y = _undo(fn(_dihedral(x, k, flip)), k, flip)
            total = y if total is None else total + y
    return total / 8


class Pending:
    """A submitted batch: `result()` -> (stored probabilities, mask), each (n, *crop), as numpy
    (affinities: (n, C, *crop) and None)."""

    def __init__(self, finish: Callable[[], tuple[np.ndarray, np.ndarray]]):
        self._finish, self._value = finish, None

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self._value is None:
            self._value, self._finish = self._finish(), None
        return self._value


class _Slot:
    """Pinned host buffers of one batch in flight, reused once that batch is collected."""

    def __init__(self):
        self.host_in = self.host_prob = self.host_mask = None
        self.uploaded = None  # event: host_in may be overwritten
        self.pending: Pending | None = None


class TileNet:
    """Batches of tiles (n, *tile), raw dtype or floats in [0, 1], through the model.

    Every forward pass has exactly `batch_size` tiles (short batches repeat their last tile): the
    kernels, and so the numbers, are then the same whichever blocks share a batch. `crop` (slices of
    the model's output, spatial axes) is what `submit` sends back. `channels`: an affinity model's
    output channels, all kept (no mask); None: channel 0 is the membrane model's probability."""

    SLOTS = 3  # batches in flight: one uploading, one computing, one downloading

    def __init__(self, model, device: torch.device, precision: str, batch_size: int, tta: bool, dims: int = 2,
                 crop: Sequence[slice] | None = None, threshold: float = 0.5, probability_dtype: str = "uint8",
                 channels: int | None = None):
        # channels_last: 1.5x fewer CPU seconds per tile in the predict benchmark, and the layout
        # tensor cores want; it changes no number beyond float rounding.
        self.memory_format = torch.channels_last if dims == 2 else torch.channels_last_3d
        self.model = model.to(device).to(memory_format=self.memory_format)
        self.device, self.batch_size, self.tta = device, batch_size, tta
        self.autocast = runtime.autocast(device, precision)
        self.crop = tuple(crop) if crop is not None else None
        self.threshold, self.probability_dtype = threshold, probability_dtype
        self.channels = channels
        self.keep = slice(None) if channels else slice(0, 1)  # the output channels stored
        # uint8 -> [0, 1] exactly as to_unit_float does it on the host, on whatever device.
        self.unit_lut = torch.from_numpy(to_unit_float(np.arange(256, dtype=np.uint8))).to(device)
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.slots = [_Slot() for _ in range(self.SLOTS)]
            self.next_slot = 0

    # ------------------------------------------------------------------------------ on the device

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            return torch.sigmoid(self.model(x).float())[:, self.keep]

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = self.unit_lut[x.long()]
        return x.contiguous(memory_format=self.memory_format)

    def _probabilities(self, x: torch.Tensor) -> torch.Tensor:
        x = self._unit(x)
        prob = tta_average(self._forward, x) if self.tta else self._forward(x)
        return prob if self.channels else prob[:, 0]

    def _stored(self, prob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(uint8 round(255 p) or float16, uint8 mask) as `data.prediction.quantize` and the mask compute them."""
        if self.crop is not None:
            prob = prob[(slice(None),) * (2 if self.channels else 1) + tuple(self.crop)]
        mask = None if self.channels else (prob > self.threshold).to(torch.uint8)
        stored = torch.round(prob * 255).to(torch.uint8) if self.probability_dtype == "uint8" else prob.half()
        return stored, mask

    # --------------------------------------------------------------------------------- the host

    def _full_batch(self, tiles: np.ndarray) -> np.ndarray:
        n = len(tiles)
        if n < self.batch_size:
            tiles = np.concatenate([tiles, np.repeat(tiles[-1:], self.batch_size - n, axis=0)])
        if tiles.dtype != np.uint8:  # other dtypes are scaled on the host, as before
            tiles = to_unit_float(tiles)
        return np.ascontiguousarray(tiles[:, None])

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """Float32 probabilities (n, *model output; affinities (n, C, ...)), uncropped; synchronous
        (warm-up, tests)."""
        n = len(tiles)
        x = torch.from_numpy(self._full_batch(tiles)).to(self.device)
        return self._probabilities(x)[:n].float().cpu().numpy()

    @torch.inference_mode()
    def submit(self, tiles: np.ndarray) -> Pending:
        """Start a batch; on a GPU this returns before the batch is computed."""
        n, batch = len(tiles), self._full_batch(tiles)
        if not self.cuda:
            stored, mask = self._stored(self._probabilities(torch.from_numpy(batch)))
            value = (stored[:n].numpy(), None if mask is None else mask[:n].numpy())
            return Pending(lambda: value)
        return self._submit_cuda(n, batch)

    def _submit_cuda(self, n: int, batch: np.ndarray) -> Pending:
        slot = self.slots[self.next_slot]
        self.next_slot = (self.next_slot + 1) % len(self.slots)
        if slot.pending is not None:  # its buffers are about to be reused: collect it first
            slot.pending.result()
        if slot.host_in is None or tuple(slot.host_in.shape) != batch.shape or \
                slot.host_in.numpy().dtype != batch.dtype:
            slot.host_in = torch.empty(batch.shape, dtype=torch.from_numpy(batch[:0]).dtype, pin_memory=True)
            slot.host_prob = slot.host_mask = None
        elif slot.uploaded is not None:
            slot.uploaded.synchronize()
        slot.host_in.numpy()[...] = batch
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.copy_stream):
            # The copy stream may still hold the previous batch's download: uploads queue behind it,
            # which is fine (each is short next to a forward pass).
            x = slot.host_in.to(self.device, non_blocking=True)
            slot.uploaded = torch.cuda.Event()
            slot.uploaded.record(self.copy_stream)
        compute.wait_event(slot.uploaded)
        x.record_stream(compute)  # allocated on the copy stream, used (and freed) on the compute one
        stored, mask = self._stored(self._probabilities(x))
        computed = torch.cuda.Event()
        computed.record(compute)
        if slot.host_prob is None or tuple(slot.host_prob.shape) != tuple(stored.shape):
            slot.host_prob = torch.empty(stored.shape, dtype=stored.dtype, pin_memory=True)
            slot.host_mask = None if mask is None else torch.empty(mask.shape, dtype=mask.dtype, pin_memory=True)
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(computed)
            for host, device in ((slot.host_prob, stored), (slot.host_mask, mask)):
                if device is not None:
                    host.copy_(device, non_blocking=True)
                    device.record_stream(self.copy_stream)
            downloaded = torch.cuda.Event()
            downloaded.record(self.copy_stream)

        def finish() -> tuple[np.ndarray, np.ndarray | None]:
            downloaded.synchronize()
            slot.pending = None
            mask_out = None if slot.host_mask is None else slot.host_mask[:n].numpy().copy()
            return slot.host_prob[:n].numpy().copy(), mask_out

        slot.pending = Pending(finish)
        return slot.pending
