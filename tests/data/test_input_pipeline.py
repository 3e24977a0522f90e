"""Input pipeline: per-process slices, resumable state, clip sampling, image frames, to_global."""

import json

import imageio.v3 as iio
import jax
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from magicvideo_jax import config as config_lib
from magicvideo_jax.data import input_pipeline
from magicvideo_jax.data import video_folder

SOURCE_FPS = 24.0


def ramp_video(num_frames, height=8, width=8, offset=0):
  """Frame t has the flat value offset + t, so sampled pixels reveal frame indices."""
  values = (offset + np.arange(num_frames)).astype(np.uint8)
  return np.broadcast_to(values[:, None, None, None], (num_frames, height, width, 3)).copy()


def make_source(n, num_frames=32, height=8, width=8):
  return [dict(video=ramp_video(num_frames, height, width, offset=i % 4),
               caption=f'clip {i}'.encode(), fps=np.float32(SOURCE_FPS)) for i in range(n)]


def frame_ids(video):
  """[B, F, H, W, 3] in [-1, 1] -> the integer pixel values of every frame, [B, F]."""
  return np.rint((video[..., 0, 0, 0] + 1) * 127.5).astype(int)


def take(it, k):
  return [next(it) for _ in range(k)]


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


COMMON = dict(global_batch_size=8, num_frames=4, frame_stride_range=(1, 3), resolution=8,
              caption_dropout=0.2, seed=3)


def test_process_slices_are_disjoint_cover_the_epoch_and_concatenate_to_the_global_batch():
  source = make_source(48)
  single = input_pipeline.make_iterator(source, process_index=0, process_count=1, **COMMON)
  steps = single.steps_per_epoch
  assert steps == 6
  global_batches = take(single, 2 * steps)  # Two epochs.
  for count in (2, 4):
    iters = [input_pipeline.make_iterator(source, process_index=p, process_count=count, **COMMON)
             for p in range(count)]
    per_process = [take(it, 2 * steps) for it in iters]
    for epoch in range(2):
      seen = [b['index'] for p in range(count)
              for b in per_process[p][epoch * steps:(epoch + 1) * steps]]
      seen = np.concatenate(seen)
      assert len(seen) == 48 and len(set(seen.tolist())) == 48  # Disjoint, covers the split.
    for step in range(2 * steps):
      parts = [per_process[p][step] for p in range(count)]
      assert all(len(b['index']) == 8 // count for b in parts)
      merged = {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
      assert_batches_equal(merged, global_batches[step])
  # A new permutation every epoch, and a different one for another seed.
  first, second = (np.concatenate([b['index'] for b in global_batches[e * steps:(e + 1) * steps]])
                   for e in range(2))
  assert not np.array_equal(first, second)
  other = input_pipeline.make_iterator(source, process_count=1, process_index=0,
                                       **dict(COMMON, seed=4))
  assert not np.array_equal(next(other)['index'], global_batches[0]['index'])


@pytest.mark.parametrize('prefetch,num_threads', [(0, 1), (2, 3)])
def test_restored_state_gives_the_next_batch(prefetch, num_threads):
  source = make_source(40)
  kwargs = dict(COMMON, process_index=1, process_count=2, prefetch=prefetch,
                num_threads=num_threads)
  reference = input_pipeline.make_iterator(source, **kwargs)
  expected = take(reference, 12)  # 5 steps an epoch: crosses two epoch boundaries.
  reference.close()
  for k in (0, 3, 5, 7):
    it = input_pipeline.make_iterator(source, **kwargs)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    take(it, 2)  # Run ahead (and let the prefetcher fill its queue) before the restore.
    it.close()
    fresh = input_pipeline.make_iterator(source, **kwargs)
    fresh.set_state(state)
    for j in range(k, k + 3):
      assert_batches_equal(next(fresh), expected[j])
    fresh.close()
  # The same position restored on another process count gives this process's slice.
  single = input_pipeline.make_iterator(source, **dict(kwargs, process_index=0, process_count=1))
  single.set_state(state)
  np.testing.assert_array_equal(next(single)['index'][4:], expected[7]['index'])


def test_state_round_trips_through_orbax_json(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  it = input_pipeline.make_iterator(make_source(16), process_count=1, process_index=0, **COMMON)
  take(it, 3)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as manager:
    manager.save(3, args=ocp.args.Composite(data=ocp.args.JsonSave(it.get_state())))
    manager.wait_until_finished()
    restored = manager.restore(3, args=ocp.args.Composite(data=ocp.args.JsonRestore()))['data']
  fresh = input_pipeline.make_iterator(make_source(16), process_count=1, process_index=0, **COMMON)
  fresh.set_state(restored)
  assert_batches_equal(next(fresh), next(it))


def test_num_epochs_and_mismatched_state():
  it = input_pipeline.make_iterator(make_source(20), process_count=1, process_index=0,
                                    num_epochs=2, **COMMON)
  assert len(list(it)) == 4  # 2 steps an epoch (the last 4 examples are dropped).
  other = input_pipeline.make_iterator(make_source(24), process_count=1, process_index=0, **COMMON)
  with pytest.raises(ValueError, match='num_examples'):
    other.set_state(it.get_state())


def test_clip_sampling_fps_range_and_caption_dropout():
  n = 400
  source = make_source(n, num_frames=16)
  tokenize = lambda captions: np.array([[len(c), 7] for c in captions])
  it = input_pipeline.make_iterator(
      source, global_batch_size=n, num_frames=5, frame_stride_range=(1, 4), resolution=8,
      caption_dropout=0.25, tokenize_fn=tokenize, seed=0, process_index=0, process_count=1)
  batch = next(it)
  video = batch['video']
  assert video.dtype == np.float32 and video.shape == (n, 5, 8, 8, 3)
  assert video.min() >= -1 and video.max() <= 1
  ids = frame_ids(video) - (batch['index'] % 4)[:, None]
  strides = np.diff(ids, axis=1)
  assert (strides == strides[:, :1]).all()  # One stride per clip.
  stride = strides[:, 0]
  # 16 stored frames allow strides up to 3 for 5 frames; all of 1..3 occur.
  assert set(stride.tolist()) == {1, 2, 3}
  assert ids.min() >= 0 and ids.max() <= 15
  np.testing.assert_allclose(batch['fps'], SOURCE_FPS / stride)
  assert batch['fps'].dtype == np.float32
  dropped = batch['caption'] == ''
  print('caption dropout rate', dropped.mean())
  assert 0.18 < dropped.mean() < 0.32
  kept = ~dropped
  assert all(c == f'clip {i}' for c, i in zip(batch['caption'][kept], batch['index'][kept]))
  assert batch['input_ids'].dtype == np.int32 and batch['input_ids'].shape == (n, 2)
  np.testing.assert_array_equal(batch['input_ids'][dropped, 0], 0)
  assert batch['frame_mask'].shape == (n, 5) and batch['frame_mask'].all()


def test_pixel_range_crops_and_short_clips():
  rng = np.random.default_rng(0)
  full = (rng.random((6, 12, 20, 3)) * 255).astype(np.uint8)
  full[0, 0, 8] = (0, 255, 0)  # Inside the centre crop.
  source = [dict(video=full, caption=b'x', fps=np.float32(10))] * 8
  centre = next(input_pipeline.make_iterator(source, global_batch_size=8, num_frames=6,
                                             resolution=12, seed=0, shuffle=False,
                                             process_index=0, process_count=1))
  np.testing.assert_allclose(centre['video'][0], input_pipeline.to_float(full[:, :, 4:16]))
  assert centre['video'].min() == -1 and centre['video'].max() == 1
  crops = next(input_pipeline.make_iterator(source, global_batch_size=8, num_frames=6,
                                            resolution=12, random_crop=True, seed=0,
                                            process_index=0, process_count=1))['video']
  windows = [input_pipeline.to_float(full[:, :, x:x + 12]) for x in range(9)]
  offsets = [next(x for x, w in enumerate(windows) if np.array_equal(w, c)) for c in crops]
  assert len(set(offsets)) > 2
  # Resizing: 12x20 -> shorter side 6.
  small = next(input_pipeline.make_iterator(source, global_batch_size=8, num_frames=6,
                                            resolution=6, seed=0, process_index=0,
                                            process_count=1))['video']
  assert small.shape == (8, 6, 6, 6, 3)
  # A 6-frame clip asked for 8 frames: stride 1, then the last frame repeats.
  padded = next(input_pipeline.make_iterator(source, global_batch_size=8, num_frames=8,
                                             frame_stride_range=(2, 3), resolution=12, seed=0,
                                             process_index=0, process_count=1))
  np.testing.assert_allclose(padded['video'][0, 5:], np.repeat(padded['video'][:1, 5], 3, 0))
  np.testing.assert_allclose(padded['fps'], 10.0)


def test_appended_image_frames_and_frame_mask():
  images = [dict(image=np.full((10, 8, 3), 200 + i, np.uint8), caption=f'image {i}'.encode())
            for i in range(5)]
  it = input_pipeline.make_iterator(
      make_source(8), global_batch_size=4, num_frames=3, resolution=8, num_image_frames=2,
      image_source=images, caption_dropout=0.0, tokenize_fn=lambda c: [[len(s)] for s in c],
      seed=1, process_index=0, process_count=1)
  batch = next(it)
  assert batch['video'].shape == (4, 5, 8, 8, 3)
  np.testing.assert_array_equal(batch['frame_mask'], [[True] * 3 + [False] * 2] * 4)
  ids = frame_ids(batch['video'])
  assert (ids[:, :3] < 40).all() and (ids[:, 3:] >= 200).all()
  image_index = ids[:, 3:] - 200
  np.testing.assert_array_equal(batch['image_caption'],
                                np.vectorize(lambda i: f'image {i}')(image_index))
  assert batch['image_input_ids'].shape == (4, 2, 1)
  with pytest.raises(ValueError, match='image_source'):
    input_pipeline.make_iterator(make_source(8), global_batch_size=4, num_frames=3, resolution=8,
                                 num_image_frames=2, process_index=0, process_count=1)


def test_to_global_on_fake_devices():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((4, 2), ('data', 'fsdp'))
  it = input_pipeline.make_iterator(make_source(16), global_batch_size=8, num_frames=2,
                                    resolution=8, num_image_frames=1, image_source=[
                                        dict(image=np.zeros((8, 8, 3), np.uint8), caption=b'i')],
                                    seed=0)
  batch = next(it)
  out = input_pipeline.to_global(batch, mesh)
  video = out['video']
  assert isinstance(video, jax.Array) and video.shape == (8, 3, 8, 8, 3)
  assert video.sharding.spec == P(('data', 'fsdp'))
  assert len(video.addressable_shards) == 8
  assert all(s.data.shape == (1, 3, 8, 8, 3) for s in video.addressable_shards)
  np.testing.assert_array_equal(np.asarray(video), batch['video'])
  assert out['fps'].shape == (8,) and out['frame_mask'].dtype == bool
  assert isinstance(out['caption'], np.ndarray)  # Strings stay on the host.
  # A mesh with only a data axis.
  data_mesh = jax.make_mesh((8,), ('data',))
  assert input_pipeline.to_global(batch, data_mesh)['fps'].sharding.spec == P(('data',))


@pytest.fixture(scope='module')
def built_dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp('pipeline_videos')
  with open(root / 'captions.csv', 'w') as f:
    f.write('path,caption\n')
    for i in range(8):
      iio.imwrite(root / f'{i}.mp4', ramp_video(12, 24, 32, offset=20 * i) * 1, plugin='pyav',
                  codec='libx264', fps=12)
      f.write(f'{i}.mp4,video {i}\n')
  builder = video_folder.VideoFolder(video_dir=str(root), num_frames=12, min_frames=8,
                                     resolution=16, data_dir=str(root / 'tfds'))
  builder.download_and_prepare()
  return builder


@pytest.mark.slow  # Fast tier: over 6 s on 2 cores.
def test_create_iterator_from_config_on_a_built_video_folder(built_dataset):
  config = config_lib.data_defaults()
  config.dataset = 'video_folder/' + built_dataset.builder_config.name
  config.data_dir = str(built_dataset.data_dir).split('/video_folder/')[0]
  config.update(global_batch_size=4, num_frames=4, frame_stride_range=(1, 3), resolution=16,
                prefetch=1, num_threads=2, caption_dropout=0.0)
  it = input_pipeline.create_iterator(config, process_index=0, process_count=1)
  batches = take(it, 3)  # Crosses the epoch boundary (2 steps an epoch).
  it.close()
  for batch in batches:
    assert batch['video'].shape == (4, 4, 16, 16, 3)
    assert set(batch['caption']) <= {f'video {i}' for i in range(8)}
    np.testing.assert_allclose(batch['fps'] * np.rint(12 / batch['fps']), 12.0, rtol=1e-6)
  # The directory itself works as `dataset` too.
  direct = input_pipeline.create_iterator(
      ml_collections.ConfigDict(dict(config.to_dict(), dataset=str(built_dataset.data_dir),
                                     data_dir=None, prefetch=0)),
      process_index=0, process_count=1)
  assert_batches_equal(next(direct), batches[0])
  with pytest.raises(FileNotFoundError, match='not prepared'):
    input_pipeline.load_source('video_folder/nothing_here', data_dir=config.data_dir)
