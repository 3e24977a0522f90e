"""The moving-shapes dataset: renderer, captions, held-out combinations, TFDS build without TF."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from magicvideo_jax.data import moving_shapes as ms

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SMALL = dict(num_frames=8, resolution=32, train_size=160, validation_size=24, test_size=24,
             seed=3)
OFFLINE = tfds.download.DownloadConfig(try_download_gcs=False)

# Builds the small config in a fresh interpreter that cannot import TensorFlow (installed in this
# venv for clu), proving the build is TF-free.
_BUILD_WITHOUT_TF = textwrap.dedent('''
    import importlib.machinery, sys
    _find_spec = importlib.machinery.PathFinder.find_spec
    def find_spec(name, path=None, target=None):
      if name == 'tensorflow' or name.startswith('tensorflow.'):
        return None
      return _find_spec(name, path, target)
    importlib.machinery.PathFinder.find_spec = find_spec
    sys.path.insert(0, {root!r})
    import tensorflow_datasets as tfds
    from magicvideo_jax.data import moving_shapes as ms
    builder = ms.MovingShapes(config=ms.MovingShapesConfig(name='small', **{small!r}),
                              data_dir={data_dir!r})
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    assert 'tensorflow' not in sys.modules, 'the build imported TensorFlow'
''')


def _read_all(source):
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  """The small config built twice: in this process and in a subprocess without TensorFlow."""
  dirs = [str(tmp_path_factory.mktemp('tfds_a')), str(tmp_path_factory.mktemp('tfds_b'))]
  builder = ms.MovingShapes(config=ms.MovingShapesConfig(name='small', **SMALL),
                            data_dir=dirs[0])
  builder.download_and_prepare(download_config=OFFLINE)
  script = _BUILD_WITHOUT_TF.format(root=ROOT, small=SMALL, data_dir=dirs[1])
  run = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                       timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  return [{split: _read_all(tfds.data_source('moving_shapes/small', data_dir=d)[split])
           for split in ms.SPLITS} for d in dirs]


def test_data_source_features(built):
  data = built[0]
  assert {s: len(v) for s, v in data.items()} == {'train': 160, 'validation': 24, 'test': 24}
  for split, examples in data.items():
    for ex in examples:
      assert ex['video'].dtype == np.uint8 and ex['video'].shape == (8, 32, 32, 3)
      assert ex['positions'].dtype == np.float32 and ex['positions'].shape == (8, 2)
      assert float(ex['fps']) == 8.0
      names = (ms.COLOUR_NAMES[ex['colour']], ms.SHAPES[ex['shape']], ms.MOTIONS[ex['motion']])
      assert ms.parse_caption(ex['caption'].decode()) == names


def test_build_matches_numpy_generator(built):
  """TFDS shuffles the order; as sets of clips the build equals `generate_split`."""
  config = ms.MovingShapesConfig(name='small', **SMALL)
  for split in ('validation', 'test'):
    expected = sorted((e['caption'], e['video'].tobytes(), e['positions'].tobytes())
                      for e in ms.generate_split(split, config))
    got = sorted((e['caption'].decode(), e['video'].tobytes(), e['positions'].tobytes())
                 for e in built[0][split])
    assert got == expected


def test_two_builds_identical(built):
  a, b = built
  for split in ms.SPLITS:
    for x, y in zip(a[split], b[split], strict=True):
      assert x.keys() == y.keys()
      for key in x:
        np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)


def test_seed_changes_clips():
  a = ms.make_example('train', 0, ms.MovingShapesConfig(name='a', seed=0))
  b = ms.make_example('train', 0, ms.MovingShapesConfig(name='b', seed=1))
  assert not np.array_equal(a['video'], b['video'])


def test_test_combinations_held_out(built):
  data = built[0]
  combos = {split: {(e['colour'], e['shape'], e['motion']) for e in data[split]}
            for split in ms.SPLITS}
  assert not combos['test'] & combos['train']
  train_ids, test_ids = map(_ids, ms.split_combinations(SMALL['seed']))
  assert combos['train'] | combos['validation'] <= train_ids and combos['test'] <= test_ids
  for i, names in enumerate((ms.COLOUR_NAMES, ms.SHAPES, ms.MOTIONS)):
    assert {c[i] for c in combos['train']} == set(range(len(names)))


def _ids(combos):
  return {(ms.COLOUR_NAMES.index(c), ms.SHAPES.index(s), ms.MOTIONS.index(m)) for c, s, m in combos}


@pytest.mark.parametrize('seed', range(5))
def test_split_combinations(seed):
  train, test = ms.split_combinations(seed)
  total = len(ms.all_combinations())
  assert len(train) + len(test) == total and not set(train) & set(test)
  assert 0.1 <= len(test) / total <= 0.15
  for i, names in enumerate((ms.COLOUR_NAMES, ms.SHAPES, ms.MOTIONS)):
    assert {c[i] for c in train} == set(names)
    assert {c[i] for c in test} == set(names)  # The held-out set touches every value too.
  assert ms.split_combinations(seed) == (train, test)


def test_caption_round_trip():
  for combo in ms.all_combinations():
    assert ms.parse_caption(ms.caption(*combo)) == combo
  assert ms.caption('red', 'circle', 'left') == 'a red circle moving left'
  assert ms.parse_caption('A blue STAR, growing!') == ('blue', 'star', 'growing')
  assert ms.parse_caption('a cat') == (None, None, None)


@pytest.mark.parametrize('resolution', [32, 64])
def test_renderer_geometry(resolution):
  """Object fully in frame, in its palette colour, centred on `positions`, moving as captioned."""
  rng = np.random.default_rng(0)
  for shape in ms.SHAPES:
    for i, motion in enumerate(ms.MOTIONS):
      colour = ms.COLOUR_NAMES[(i + ms.SHAPES.index(shape)) % len(ms.COLOUR_NAMES)]
      frames, positions = ms.render_clip(colour, shape, motion, num_frames=16,
                                         resolution=resolution, rng=rng)
      assert frames.shape == (16, resolution, resolution, 3) and frames.dtype == np.uint8
      background = frames[:, 0, 0].astype(int)
      coverage = np.abs(frames.astype(int) - background[:, None, None]).max(-1) > 0
      assert not coverage[:, [0, -1]].any() and not coverage[:, :, [0, -1]].any(), 'touches edge'
      solid = np.all(frames == np.array(ms.COLOURS[colour], np.uint8), axis=-1)
      assert solid.sum(axis=(1, 2)).min() > 0
      # Area = total coverage, read back from the channel with most contrast.
      rgb = np.array(ms.COLOURS[colour])
      k = np.argmax(np.abs(rgb - background[0]))
      alpha = (frames[..., k] - background[:, k, None, None]) / (rgb[k] - background[:, k, None, None])
      areas = alpha.sum(axis=(1, 2))
      # Centroids of the solid pixels agree with `positions` (x, y) to a pixel.
      ys, xs = np.nonzero(solid[-1])
      np.testing.assert_allclose(positions[-1] * resolution, [xs.mean() + 0.5, ys.mean() + 0.5],
                                 atol=1.0)
      travel = positions[-1] - positions[0]
      if motion == 'growing':
        assert np.allclose(travel, 0.0) and areas[-1] > 2.5 * areas[0]
      else:
        direction = {'left': (-1, 0), 'right': (1, 0), 'up': (0, -1), 'down': (0, 1)}[motion]
        assert np.dot(travel, direction) >= 1 / 3, (shape, motion, travel)
        assert np.allclose(travel * (1 - np.abs(direction)), 0.0)
        assert areas.max() <= 1.05 * areas.min()


def test_object_size():
  """Diameter of the object about 1/4-1/3 of the frame, so shapes stay legible at 32x32."""
  rng = np.random.default_rng(1)
  for shape in ms.SHAPES:
    frames, _ = ms.render_clip('white', shape, 'left', num_frames=2, resolution=32, rng=rng)
    ys, xs = np.nonzero(frames[0, ..., 0] > 128)
    extent = max(np.ptp(xs), np.ptp(ys)) + 1
    assert 7 <= extent <= 14, (shape, extent)
