"""The Colab notebook: up to date with its generator, and runs headless on CPU end to end.

The notebook (notebooks/magicvideo_colab.ipynb, written by notebooks/make_colab.py) is executed with
nbclient in a temporary working directory, with the bundled shapes checkpoint (or the checkpoint in
$MAGICVIDEO_CHECKPOINT) and few sampling steps; the video files it writes must read back with the
right number of frames and size.
"""

import importlib.util
import os
import time

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'notebooks', 'magicvideo_colab.ipynb')
GENERATOR = os.path.join(ROOT, 'notebooks', 'make_colab.py')
STEPS = 3
NUM_FRAMES = 16  # What the notebook asks for; it uses fewer if the model supports fewer.


def _generator():
  spec = importlib.util.spec_from_file_location('make_colab', GENERATOR)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_notebook_matches_generator():
  gen = _generator()
  with open(NOTEBOOK) as f:
    current = f.read()
  assert current == gen.render(gen.build_notebook()), (
      f'{NOTEBOOK} is out of date: run `.venv/bin/python notebooks/make_colab.py`')
  nb = nbformat.reads(current, as_version=4)
  nbformat.validate(nb)
  assert all(not c.get('outputs') for c in nb.cells if c.cell_type == 'code'), 'stored outputs'


def _checkpoint():
  from magicvideo_jax.demo import DEFAULT_CHECKPOINT
  checkpoint = os.environ.get('MAGICVIDEO_CHECKPOINT') or DEFAULT_CHECKPOINT
  if not os.path.isdir(checkpoint):
    pytest.fail(f'checkpoint folder {checkpoint} does not exist: the notebook samples from the '
                'bundled shapes checkpoint (magicvideo_jax/assets/shapes, made by '
                'launch/train_shapes.sh); add it, or set MAGICVIDEO_CHECKPOINT to another checkpoint.')
  return checkpoint


def _errors(nb):
  return [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
          if o.get('output_type') == 'error']


def _text(nb):
  parts = []
  for cell in nb.cells:
    for out in cell.get('outputs', []):
      parts.append(out.get('text', ''))
      parts.append(out.get('data', {}).get('text/markdown', ''))
      parts.append(out.get('data', {}).get('text/plain', ''))
  return '\n'.join(parts)


@pytest.mark.slow
def test_notebook_runs(tmp_path):
  import nbclient
  from magicvideo_jax.sampling import pipeline
  from magicvideo_jax import video_io
  checkpoint = _checkpoint()
  config = pipeline.load_config(checkpoint)
  frames = min(NUM_FRAMES, pipeline.max_frames(config) or NUM_FRAMES)
  res = int(config.data.resolution)
  size = res * max(1, 256 // res)  # The notebook enlarges small videos for viewing.
  output = str(tmp_path / 'out' / 'clip.mp4')

  env = dict(os.environ, MAGICVIDEO_CHECKPOINT=checkpoint, MAGICVIDEO_STEPS=str(STEPS),
             MAGICVIDEO_NUM_FRAMES=str(NUM_FRAMES), MAGICVIDEO_OUTPUT=output,
             PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get('PYTHONPATH')) if p))
  env.pop('XLA_FLAGS', None)  # One CPU device, as a Colab CPU runtime (conftest fakes 8).
  env.pop('MPLBACKEND', None)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(tmp_path)}})
  t0 = time.time()
  client.execute(env=env)  # A failing cell raises CellExecutionError with its traceback.
  print(f'notebook ran in {time.time() - t0:.1f} s')
  assert not _errors(nb)

  for path in (output, output[:-4] + '.gif'):
    assert os.path.isfile(path), path
    video = video_io.read_video(path)
    print(path, video.shape, video.dtype)
    assert video.shape == (frames, size, size, 3), (path, video.shape)
    assert video.dtype.name == 'uint8'
  assert not os.path.exists(os.path.join(ROOT, 'outputs', 'clip.mp4'))

  text = _text(nb)
  assert '#' + ' #' * 15 in text, 'the directed attention mask (last row) was not printed'
  assert f'{res}x{res}, {frames} frames' in text
  assert 'XLA FLOPs' in text, 'no FLOPs report'
  assert 'vdm_64' in text and 'sd15_256' in text, 'no MagicVideo vs VDM table'
  assert 'judge sees' in text and 'consistency' in text, 'no judge reading'
