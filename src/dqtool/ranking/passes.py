"""Network passes of a ranking: Cellpose's ``CellposeModel.eval`` split at CPnet's bottleneck.

A ranking costs its network passes (80-92 % of ``eval`` is the CPnet forward pass on a CPU). This
module runs exactly what ``model.eval(x, channels=[0, 0], normalize=False, diameter=d)`` runs for a
2-D image, with three differences that never change an output (tested bit for bit against ``eval``):

* the network is split where the feature perturbations act: the encoder (``net.downsample``, then
  ``net.make_style`` of its deepest output) runs once per tile, and the decoder (``net.upsample``,
  ``net.output``) runs once for the unperturbed prediction and once per feature perturbation on the
  *same* encoder output: the dropout hooks of :func:`dqtool.ranking.perturb.bottleneck_dropout` sit
  after every encoder layer, on the decoder's first block (site 'decoder') or on ``net.upsample``
  itself (site 'bottleneck', which replaces the bottleneck in a new list of encoder outputs and
  recomputes the style from it, so the encoder output and the style :meth:`ModelPasses.encode`
  returns stay unperturbed for the plain decode);
* on the CPU (MKL-DNN), tiles of several images of one tile size go through the network together,
  ``batch_size`` tiles a batch (Cellpose batches the tiles of one image only), under the rule of
  :meth:`ModelPasses.batches` that keeps every output bit for bit;
* the MKL-DNN copy of the network (Cellpose converts the network anew for every batch) is made
  once per model.

The tiling, tile averaging, resizing and mask dynamics are Cellpose's own functions, called with
the arguments ``eval`` passes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["EvalSettings", "ModelPasses", "PassCount", "Prediction", "TiledImage", "count_network_passes"]


@dataclass(frozen=True)
class EvalSettings:
    """The ``CellposeModel.eval`` settings a ranking uses (and that key the cache of its outputs)."""

    diameter: float | None = None  # None: the model's training diameter
    batch_size: int = 8
    bsize: int = 224
    tile_overlap: float = 0.1
    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0
    min_size: int = 15
    max_size_fraction: float = 0.4
    niter: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> dict:
        """What decides the unperturbed outputs: these settings and the versions that compute them.

        ``batch_size`` is left out: it changes no output (tested)."""
        import cellpose
        import torch

        d = self.to_dict()
        d.pop("batch_size")
        return {**d, "channels": [0, 0], "normalisation": "cellpose normalize_img 1-99 on gray",
                "cellpose": getattr(cellpose, "__version__", "3"), "torch": torch.__version__.split("+")[0]}


@dataclass
class Prediction:
    """One ``eval`` output: masks, flows (dP, 2 x H x W) and the cell-probability logit (H x W)."""

    masks: np.ndarray
    flows: np.ndarray
    cellprob: np.ndarray


@dataclass
class TiledImage:
    """An image cut into Cellpose's tiles, with what is needed to put the network's output together."""

    tiles: np.ndarray  # (n_tiles, nchan, ly, lx) float32
    ysub: list
    xsub: list
    Lyt: int
    Lxt: int
    padded_shape: tuple  # (Ly, Lx) of the padded (resized) image
    pads: tuple  # (ypad1, ypad2, xpad1, xpad2)
    shape: tuple  # (1, Ly0, Lx0, nchan), the shape eval's _compute_masks sees

    @property
    def tile_shape(self) -> tuple:
        return self.tiles.shape[1:]


@dataclass
class PassCount:
    """Tiles that went through the encoder (``net.downsample``) and the decoder (``net.upsample``)."""

    encoder_tiles: int = 0
    decoder_tiles: int = 0
    encoder_calls: int = 0
    decoder_calls: int = 0


@contextlib.contextmanager
def count_network_passes() -> Iterator[PassCount]:
    """Count the tiles every CPnet's encoder and decoder process while the block runs (forward hooks).

    A global module forward hook, so it counts ``CellposeModel.eval`` and :class:`ModelPasses` alike,
    whatever copy of the network (MKL-DNN) actually runs.
    """
    from cellpose import resnet_torch
    from torch.nn.modules.module import register_module_forward_hook

    count = PassCount()

    def hook(module, args, output):
        if isinstance(module, resnet_torch.downsample):
            count.encoder_tiles += int(args[0].shape[0])
            count.encoder_calls += 1
        elif isinstance(module, resnet_torch.upsample):
            count.decoder_tiles += int(args[0].shape[0])  # args = (style, xd, mkldnn)
            count.decoder_calls += 1

    handle = register_module_forward_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


class ModelPasses:
    """The network passes of one loaded ``CellposeModel`` under fixed :class:`EvalSettings`."""

    def __init__(self, model, settings: EvalSettings | None = None):
        import torch
        from torch.utils import mkldnn as mkldnn_utils

        self.model = model
        self.settings = settings = settings or EvalSettings()
        net = model.net
        net.eval()
        self.mkldnn = bool(getattr(net, "mkldnn", False))
        self.net = mkldnn_utils.to_mkldnn(net) if self.mkldnn else net
        self.device = net.device
        self._torch = torch
        d = settings.diameter
        self.rescale = float(model.diam_mean / d) if d is not None and d > 0 else \
            float(model.diam_mean / model.diam_labels)

    # ---------------------------------------------------------------------------------- tiling
    def tile(self, x: np.ndarray) -> TiledImage:
        """``eval``'s conversion, padding and tiling of a normalised 2-D grayscale image."""
        from cellpose import transforms

        img = transforms.convert_image(x, [0, 0], channel_axis=None, z_axis=None, do_3D=False,
                                       nchan=self.model.nchan)
        if img.ndim < 4:
            img = img[np.newaxis, ...]
        img = np.asarray(img)
        _, Ly0, Lx0, nchan = img.shape
        rsz = [self.rescale, self.rescale] if self.rescale != 1.0 else None
        Lyr, Lxr = (int(Ly0 * rsz[0]), int(Lx0 * rsz[1])) if rsz is not None else (Ly0, Lx0)
        ypad1, ypad2, xpad1, xpad2 = transforms.get_pad_yx(Lyr, Lxr)
        pads = np.array([[0, 0], [ypad1, ypad2], [xpad1, xpad2]])
        imgb = transforms.resize_image(img[0], rsz=rsz) if rsz is not None else img[0].copy()
        imgb = np.pad(imgb.transpose(2, 0, 1), pads, mode="constant")
        bsize, overlap = self.settings.bsize, self.settings.tile_overlap
        IMG, ysub, xsub, Lyt, Lxt = transforms.make_tiles(imgb, bsize=bsize, augment=False, tile_overlap=overlap)
        Ly, Lx = Lyr + ypad1 + ypad2, Lxr + xpad1 + xpad2
        ny = 1 if Ly <= bsize else int(np.ceil((1.0 + 2 * overlap) * Ly / bsize))
        nx = 1 if Lx <= bsize else int(np.ceil((1.0 + 2 * overlap) * Lx / bsize))
        ly, lx = min(bsize, Ly), min(bsize, Lx)
        tiles = np.zeros((ny * nx, nchan, ly, lx), "float32")
        tiles[:] = np.reshape(IMG, (ny * nx, nchan, ly, lx))
        return TiledImage(tiles, ysub, xsub, Lyt, Lxt, imgb.shape[-2:], (ypad1, ypad2, xpad1, xpad2),
                          img.shape)

    # ---------------------------------------------------------------------------------- the net
    def encode(self, tiles: np.ndarray):
        """CPnet up to the bottleneck: the encoder outputs T0 and the style vector of a batch of tiles."""
        torch = self._torch
        X = torch.from_numpy(tiles).to(self.device, dtype=torch.float32)
        with torch.no_grad():
            data = X.to_mkldnn() if self.mkldnn else X
            T0 = self.net.downsample(data)
            style = self.net.make_style(T0[-1].to_dense() if self.mkldnn else T0[-1])
        return T0, style

    def decode(self, encoded) -> np.ndarray:
        """CPnet after the bottleneck: flows and cell probability (n, 3, ly, lx) of encoded tiles."""
        torch = self._torch
        T0, style = encoded
        with torch.no_grad():
            T1 = self.net.output(self.net.upsample(style, T0, self.mkldnn))
            if self.mkldnn:
                T1 = T1.to_dense()
        return T1.detach().cpu().numpy()

    # ---------------------------------------------------------------------------------- assembling
    def untile(self, tiled: TiledImage, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``run_net``'s tile averaging and cropping, then ``_run_net``'s resize: (dP, cellprob)."""
        from cellpose import transforms

        ypad1, ypad2, xpad1, xpad2 = tiled.pads
        Ly, Lx = tiled.padded_shape
        yf = np.zeros((1, self.model.net.nout, Ly, Lx), "float32")
        yfi = transforms.average_tiles(y, tiled.ysub, tiled.xsub, tiled.Lyt, tiled.Lxt)
        yf[0] = yfi[:, :Ly, :Lx]
        yf = yf[:, :, ypad1:Ly - ypad2, xpad1:Lx - xpad2].transpose(0, 2, 3, 1)
        if self.rescale != 1.0:
            yf = transforms.resize_image(yf, tiled.shape[1], tiled.shape[2])
        return yf[..., :2].transpose((3, 0, 1, 2)), yf[..., 2]

    def masks(self, tiled: TiledImage, dP: np.ndarray, cellprob: np.ndarray) -> Prediction:
        """``eval``'s mask dynamics on assembled outputs (the model's own ``_compute_masks``)."""
        s = self.settings
        niter = s.niter if s.niter else (1 / self.rescale * 200)
        from dqtool.common.notices import known_notices_hidden

        with known_notices_hidden():  # torch's sparse-invariant notice from Cellpose's dynamics
            masks = self.model._compute_masks(tiled.shape, dP, cellprob, flow_threshold=s.flow_threshold,
                                              cellprob_threshold=s.cellprob_threshold, interp=True,
                                              min_size=s.min_size, max_size_fraction=s.max_size_fraction,
                                              niter=niter, stitch_threshold=0.0, do_3D=False)
        return Prediction(np.asarray(masks.squeeze()), np.asarray(dP.squeeze(), np.float32),
                          np.asarray(cellprob.squeeze(), np.float32))

    # ---------------------------------------------------------------------------------- batches
    def batches(self, n_tiles: Sequence[int]) -> list[np.ndarray]:
        """Batches of tile indices (tiles numbered image after image) that give ``eval``'s outputs.

        ``eval`` runs the tiles of one image in batches of ``batch_size``. With MKL-DNN (CPU), a
        tile's output is the same in every batch of two or more tiles, whatever its companions, but
        differs in the last bits when it runs alone (measured on torch 2.13; tested against ``eval``):
        so a tile that ``eval`` runs alone still runs alone, and all other tiles of all images are
        packed ``batch_size`` a batch, never leaving one alone. Elsewhere (CUDA, plain CPU) the
        batches are ``eval``'s own, one image at a time.
        """
        bs = max(1, int(self.settings.batch_size))
        starts = np.concatenate([[0], np.cumsum(n_tiles)]).astype(int)
        per_image = [np.arange(starts[i], starts[i + 1]) for i in range(len(n_tiles))]
        if not self.mkldnn or bs == 1:
            return [idx[j:j + bs] for idx in per_image for j in range(0, len(idx), bs)]
        alone = [idx[-1:] for idx in per_image if len(idx) % bs == 1]
        packed = np.concatenate([idx[:-1] if len(idx) % bs == 1 else idx for idx in per_image] + [[]]).astype(int)
        sizes = [bs] * (len(packed) // bs) + ([len(packed) % bs] if len(packed) % bs else [])
        if len(sizes) > 1 and sizes[-1] == 1:  # never a batch of one: bs - 1 >= 2 and 2
            sizes[-2:] = [bs - 1, 2]
        bounds = np.cumsum([0] + sizes)
        return [packed[bounds[k]:bounds[k + 1]] for k in range(len(sizes))] + alone

    def run(self, tiled: Sequence[TiledImage], heads: Callable[[object], dict]) -> list[dict]:
        """Encode the tiles of all images in :meth:`batches`, images of one tile size together.

        ``heads(encoded)`` returns ``{variant: (n, 3, ly, lx) array}`` for a batch (the decoder runs,
        plain or perturbed); the result is per image ``{variant: (n_tiles, 3, ly, lx)}``.
        """
        out: list[dict] = [{} for _ in tiled]
        groups: dict[tuple, list[int]] = {}
        for i, t in enumerate(tiled):
            groups.setdefault(t.tile_shape, []).append(i)
        for members in groups.values():
            counts = [len(tiled[i].tiles) for i in members]
            tiles = np.concatenate([tiled[i].tiles for i in members])
            ys: dict[str, np.ndarray] = {}
            for idx in self.batches(counts):
                for variant, y in heads(self.encode(tiles[idx])).items():
                    if variant not in ys:
                        ys[variant] = np.zeros((len(tiles),) + y.shape[1:], np.float32)
                    ys[variant][idx] = y
            start = 0
            for i, n in zip(members, counts):
                for variant, y in ys.items():
                    out[i][variant] = y[start:start + n]
                start += n
        return out
