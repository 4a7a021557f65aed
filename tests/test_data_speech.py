"""The documented MFCC-like transform for Speech Commands."""
import importlib.util

import numpy as np
import pytest
import scipy.fft

from sparsefl_jax.data import DatasetNotFoundError, build_federated_dataset
from sparsefl_jax.data import speech


def reference(wave):
  """Frame-by-frame loop with scipy's orthonormal DCT-II."""
  x = np.zeros(16000)
  x[:min(16000, wave.size)] = wave[:16000] / 32768.0
  out = np.empty((32, 32))
  for t in range(32):
    seg = x[480 * t:480 * t + 1024] * np.hanning(1024)
    power = np.abs(np.fft.rfft(seg)) ** 2
    log_mel = np.log(power @ speech.mel_filterbank() + 1e-6)
    out[t] = scipy.fft.dct(log_mel, type=2, norm="ortho")[:32]
  return out


def test_matches_loop_reference_and_pads():
  rng = np.random.default_rng(0)
  long = rng.integers(-3000, 3000, 17000).astype(np.int16)
  short = rng.integers(-3000, 3000, 9000).astype(np.int16)
  padded = np.zeros(17000, np.int16)
  padded[:9000] = short
  got = speech.mfcc_like(np.stack([long, padded]))
  assert got.shape == (2, 32, 32, 1) and got.dtype == np.float32
  np.testing.assert_allclose(got[0, ..., 0], reference(long), rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(got[1, ..., 0], reference(short), rtol=1e-3, atol=1e-3)


def test_filterbank_centres_on_mel_scale():
  fb = speech.mel_filterbank()
  assert fb.shape == (513, 40) and fb.min() >= 0 and fb.max() <= 1
  freqs = np.fft.rfftfreq(1024, 1 / 16000)
  mel = lambda f: 2595 * np.log10(1 + f / 700)  # noqa: E731
  centres = freqs[fb.argmax(0)]
  spacing = np.diff(mel(centres))
  assert np.all(np.diff(centres) > 0)
  # Equal spacing on the mel scale (up to the 15.6 Hz bin resolution).
  assert spacing.std() / spacing.mean() < 0.2
  # A 1 kHz tone lights up the band whose centre is nearest 1 kHz.
  tone = (np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000) * 8000).astype(np.int16)
  frames = tone[:1024] * np.hanning(1024)
  energy = (np.abs(np.fft.rfft(frames)) ** 2) @ fb
  assert abs(centres[energy.argmax()] - 1000) <= np.max(np.diff(centres))


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="TensorFlow installed; the TF-missing message does not apply")
def test_speech_commands_without_tf_says_what_to_install():
  with pytest.raises(DatasetNotFoundError, match="pip install tensorflow-cpu"):
    build_federated_dataset("speech_commands", num_clients=2)
