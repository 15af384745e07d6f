"""Video and action metrics on plain arrays: PSNR, SSIM, action MSE, and the Fréchet distance behind FVD.

Images are float in [0, `data_range`], laid out [..., 3, H, W] (any leading batch/frame axes). Every
function returns per-image values so callers choose how to average; the evaluation averages per frame.
LPIPS and FVD need learned feature networks: `FeatureNet` loads one from a local TorchScript file and
nothing here ever downloads one or substitutes a stand-in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Wang et al. 2004: an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03.
SSIM_SIGMA = 1.5
SSIM_RADIUS = 5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _as_tensor(x) -> torch.Tensor:
    return x.detach().double() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), dtype=torch.float64)


def _check_pair(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if pred.dim() < 3:
        raise ValueError(f"images must be [..., C, H, W], got {tuple(pred.shape)}")


def psnr(pred, target, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image [...]: 10 log10(range^2 / MSE); identical images give +inf."""
    p, t = _as_tensor(pred), _as_tensor(target)
    _check_pair(p, t)
    mse = ((p - t) ** 2).flatten(-3).mean(-1)
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    x = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    g = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]  # [1, 1, 11, 11]


def ssim(pred, target, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per image [...] (mean over channels and the valid window positions).

    Gaussian-weighted local statistics without sample-covariance correction, as in the paper; images
    smaller than the 11x11 window are an error rather than a silently different statistic.
    """
    p, t = _as_tensor(pred), _as_tensor(target)
    _check_pair(p, t)
    lead, (c, h, w) = p.shape[:-3], p.shape[-3:]
    if h < 2 * SSIM_RADIUS + 1 or w < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"SSIM needs images of at least {2 * SSIM_RADIUS + 1}x{2 * SSIM_RADIUS + 1}, got {h}x{w}")
    p, t = p.reshape(-1, 1, h, w), t.reshape(-1, 1, h, w)
    win = _gaussian_window(p.device)
    blur = lambda x: F.conv2d(x, win)  # noqa: E731 - valid positions only
    mu_p, mu_t = blur(p), blur(t)
    var_p = blur(p * p) - mu_p**2
    var_t = blur(t * t) - mu_t**2
    cov = blur(p * t) - mu_p * mu_t
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p**2 + mu_t**2 + c1) * (var_p + var_t + c2))
    return s.mean(dim=(-2, -1)).reshape(*lead, c).mean(-1)


def action_mse(pred, target, dims: int | None = None) -> torch.Tensor:
    """Mean squared error per window [B] over the first `dims` action dimensions (the tier's real ones)."""
    p, t = _as_tensor(pred), _as_tensor(target)
    if p.shape != t.shape:
        raise ValueError(f"predicted actions {tuple(p.shape)} and targets {tuple(t.shape)} differ in shape")
    if dims is not None:
        p, t = p[..., :dims], t[..., :dims]
    return ((p - t) ** 2).flatten(1).mean(-1)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)): the distance FID and FVD report."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError("feature statistics of different dimensions")
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():  # singular product: nudge both diagonals, as the FID reference does
        eps = np.eye(s1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need [N >= 2, D] features for a Fréchet distance, got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


class FeatureNet:
    """A learned feature network from a local TorchScript file (never downloaded).

    LPIPS: ``net(a, b)`` on images [N, 3, H, W] in [-1, 1] returns a distance per pair.
    FVD: ``net(video)`` on clips [N, 3, T, H, W] in [-1, 1] returns features [N, D] (e.g. an I3D export).
    """

    def __init__(self, path: str | Path, what: str):
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"{what} weights: '{p}' is not a file (a TorchScript export is expected); "
                                    f"{what} is only reported from local weights")
        try:
            self.net = torch.jit.load(str(p), map_location="cpu").eval()
        except Exception as e:  # noqa: BLE001 - name the file whatever TorchScript says
            raise ValueError(f"{what} weights: '{p}' is not a loadable TorchScript module ({e})") from None
        self.path, self.what = p, what

    @torch.no_grad()
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.net(a.float() * 2 - 1, b.float() * 2 - 1).reshape(a.shape[0], -1).mean(-1).double()

    @torch.no_grad()
    def features(self, video: torch.Tensor) -> np.ndarray:
        out = self.net(video.float() * 2 - 1)
        return out.reshape(video.shape[0], -1).double().numpy()

