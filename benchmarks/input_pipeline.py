r"""Input-pipeline throughput: clips/s into the host, per host CPU core and per local device.

Builds a small VideoFolder from generated mp4 files (or reads a prepared dataset with --dataset),
then times `next(iterator)` over --num_batches batches after --warmup batches:

  python -m benchmarks.input_pipeline --num_batches 20 --global_batch_size 8 --num_frames 16 \
      --resolution 64

Decoding happens at build time, so the pipeline cost is array_record reads, clip sampling,
resize/crop and float conversion; the build line reports the decode rate (videos/s) separately.
"""

import os
import tempfile
import time

from absl import app
from absl import flags
from absl import logging

flags.DEFINE_integer('num_batches', 20, 'Batches timed.')
flags.DEFINE_integer('warmup', 2, 'Batches before timing starts.')
flags.DEFINE_integer('global_batch_size', 8, 'Clips per batch (one process).')
flags.DEFINE_integer('num_frames', 16, 'Frames per clip.')
flags.DEFINE_list('frame_stride_range', ['1', '2'], 'min,max frame stride.')
flags.DEFINE_integer('resolution', 64, 'Output resolution of the pipeline.')
flags.DEFINE_bool('random_crop', False, 'Random instead of centre crops.')
flags.DEFINE_integer('num_threads', 2, 'Pipeline decoding threads.')
flags.DEFINE_integer('prefetch', 2, 'Batches prefetched on a background thread.')
flags.DEFINE_string('dataset', None, 'A prepared dataset directory (skips the build).')
flags.DEFINE_string('workdir', None, 'Where generated videos and the dataset go (default: tmp).')
flags.DEFINE_integer('num_videos', 16, 'Generated videos.')
flags.DEFINE_integer('video_frames', 48, 'Frames per generated video.')
flags.DEFINE_integer('video_height', 144, 'Height of the generated videos.')
flags.DEFINE_integer('video_width', 256, 'Width of the generated videos.')
flags.DEFINE_integer('stored_frames', 32, 'num_frames of the built VideoFolder.')
flags.DEFINE_integer('stored_resolution', None, 'resolution of the built VideoFolder '
                     '(default --resolution).')
flags.DEFINE_integer('build_workers', 2, 'Decoding threads during the build.')
FLAGS = flags.FLAGS


def make_videos(video_dir: str):
  """Writes --num_videos moving-gradient mp4s and their captions.csv."""
  import imageio.v3 as iio  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  os.makedirs(video_dir, exist_ok=True)
  h, w, t = FLAGS.video_height, FLAGS.video_width, FLAGS.video_frames
  yy, xx = np.mgrid[:h, :w]
  with open(os.path.join(video_dir, 'captions.csv'), 'w') as f:
    f.write('path,caption\n')
    for i in range(FLAGS.num_videos):
      frames = np.stack([np.stack([(xx + 4 * k + 9 * i) % 256, (yy + 2 * k) % 256,
                                   np.full_like(xx, 17 * i % 256)], -1) for k in range(t)])
      iio.imwrite(os.path.join(video_dir, f'{i}.mp4'), frames.astype(np.uint8), plugin='pyav',
                  codec='libx264', fps=24)
      f.write(f'{i}.mp4,a gradient moving right number {i}\n')


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from magicvideo_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from magicvideo_jax.data import video_folder  # pylint: disable=g-import-not-at-top

  dataset = FLAGS.dataset
  if dataset is None:
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix='bench_input_pipeline_')
    video_dir = os.path.join(workdir, 'videos')
    if not os.path.exists(os.path.join(video_dir, 'captions.csv')):
      make_videos(video_dir)
    builder = video_folder.VideoFolder(
        video_dir=video_dir, num_frames=FLAGS.stored_frames, min_frames=FLAGS.num_frames,
        resolution=FLAGS.stored_resolution or FLAGS.resolution,
        data_dir=os.path.join(workdir, 'tfds'), num_workers=FLAGS.build_workers)
    start = time.perf_counter()
    prepared = builder.is_prepared()
    builder.download_and_prepare()
    if not prepared:
      seconds = time.perf_counter() - start
      print(f'build: {FLAGS.num_videos} videos {FLAGS.video_frames}x{FLAGS.video_height}x'
            f'{FLAGS.video_width} -> {FLAGS.stored_frames} frames at '
            f'{FLAGS.stored_resolution or FLAGS.resolution}px in {seconds:.2f} s '
            f'({FLAGS.num_videos / seconds:.1f} videos/s, {FLAGS.build_workers} threads)')
    dataset = builder.data_dir

  it = input_pipeline.make_iterator(
      input_pipeline.load_source(dataset), global_batch_size=FLAGS.global_batch_size,
      num_frames=FLAGS.num_frames,
      frame_stride_range=tuple(int(s) for s in FLAGS.frame_stride_range),
      resolution=FLAGS.resolution, random_crop=FLAGS.random_crop, caption_dropout=0.1, seed=0,
      process_index=0, process_count=1, num_threads=FLAGS.num_threads, prefetch=FLAGS.prefetch)
  for _ in range(FLAGS.warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(FLAGS.num_batches):
    batch = next(it)
  seconds = time.perf_counter() - start
  it.close()
  clips = FLAGS.num_batches * FLAGS.global_batch_size
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  devices = jax.local_device_count()
  rate = clips / seconds
  print(f"batch: video {batch['video'].shape} {batch['video'].dtype}, "
        f"{batch['video'].nbytes / 2**20:.1f} MiB")
  print(f'{clips} clips in {seconds:.2f} s: {rate:.1f} clips/s into the host, '
        f'{rate / cores:.1f} clips/s per host CPU core ({cores} cores), '
        f'{rate / devices:.1f} clips/s per local device ({devices} {jax.default_backend()}); '
        f'{FLAGS.num_threads} threads, prefetch {FLAGS.prefetch}')


if __name__ == '__main__':
  logging.set_verbosity(logging.WARNING)
  app.run(main)
