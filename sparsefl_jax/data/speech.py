"""Speech Commands waveforms -> 32x32x1 MFCC-like features, in numpy (no TF).

ZeroFL trains on 32x32 MFCC "images" of the 1 s, 16 kHz keyword clips. The
exact front end is not published, so this module fixes one, documented here:

  1. waveform: int16 -> float32 / 32768; zero-padded or cut to 16000 samples;
  2. frames: 32 Hann-windowed frames of 1024 samples (64 ms), hop 480 (30 ms),
     i.e. frame t covers samples [480 t, 480 t + 1024), t = 0..31;
  3. power spectrum |rFFT_1024|^2 (513 bins);
  4. 40 triangular mel filters (HTK mel scale 2595 log10(1 + f/700)),
     20 Hz .. 8000 Hz, unit peak;
  5. log(mel energy + 1e-6);
  6. DCT-II with orthonormal scaling over the 40 mel bands, keep the first 32
     coefficients (c0 included);
  7. output (32 frames, 32 coefficients, 1) float32: time on the first axis.

Standardisation happens later, per dataset, like every other dataset here.
"""
from __future__ import annotations

import functools

import numpy as np

SAMPLE_RATE = 16000
NUM_SAMPLES = 16000
FRAME_LENGTH = 1024
HOP = 480
NUM_FRAMES = 32
NUM_MELS = 40
NUM_COEFFS = 32
F_MIN, F_MAX = 20.0, 8000.0
LOG_EPS = 1e-6


def _hz_to_mel(f):
  return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)


def _mel_to_hz(m):
  return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=None)
def mel_filterbank() -> np.ndarray:
  """(513, 40) triangular filters on the rFFT bins, peak 1 at each centre."""
  freqs = np.fft.rfftfreq(FRAME_LENGTH, 1.0 / SAMPLE_RATE)
  edges = _mel_to_hz(np.linspace(_hz_to_mel(F_MIN), _hz_to_mel(F_MAX), NUM_MELS + 2))
  lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]
  up = (freqs[:, None] - lo) / (mid - lo)
  down = (hi - freqs[:, None]) / (hi - mid)
  return np.maximum(0.0, np.minimum(up, down)).astype(np.float64)


@functools.lru_cache(maxsize=None)
def dct_matrix() -> np.ndarray:
  """(40, 32) orthonormal DCT-II basis: coeffs = log_mel @ dct_matrix()."""
  n = np.arange(NUM_MELS)[:, None]
  k = np.arange(NUM_COEFFS)[None, :]
  basis = np.cos(np.pi / NUM_MELS * (n + 0.5) * k) * np.sqrt(2.0 / NUM_MELS)
  basis[:, 0] /= np.sqrt(2.0)
  return basis


def mfcc_like(waveforms: np.ndarray) -> np.ndarray:
  """(B, L) int16 or float waveforms -> (B, 32, 32, 1) float32 features."""
  w = np.asarray(waveforms)
  if w.ndim == 1:
    w = w[None]
  if w.ndim != 2:
    raise ValueError(f"waveforms must be (B, L), got shape {w.shape}")
  if w.dtype == np.int16:
    w = w.astype(np.float32) / 32768.0
  w = w.astype(np.float32)
  fixed = np.zeros((w.shape[0], NUM_SAMPLES), np.float32)
  n = min(NUM_SAMPLES, w.shape[1])
  fixed[:, :n] = w[:, :n]
  starts = np.arange(NUM_FRAMES) * HOP
  frames = fixed[:, starts[:, None] + np.arange(FRAME_LENGTH)]  # (B, 32, 1024)
  frames = frames * np.hanning(FRAME_LENGTH).astype(np.float32)
  power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2  # (B, 32, 513)
  log_mel = np.log(power @ mel_filterbank() + LOG_EPS)  # (B, 32, 40)
  return (log_mel @ dct_matrix()).astype(np.float32)[..., None]
