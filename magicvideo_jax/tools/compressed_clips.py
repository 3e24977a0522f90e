r"""A `video_folder` dataset of generated clips stored as lossy mp4: real-world compression noise.

Writes clips as H.264 files at a low quality (block artefacts and mosquito noise that change from
frame to frame, as in web video) with a `captions.csv`, then builds the `video_folder` dataset from
the files, so that everything downstream reads them like any folder of videos. The clips are the
procedurally generated `moving_shapes` clips of a split, or, with `--checkpoint`, videos sampled from
a trained model for that split's captions.

  python -m magicvideo_jax.tools.compressed_clips --output_dir /tmp/shapes_mp4 --split test --num_clips 64 \
      --quality 3 [--checkpoint magicvideo_jax/assets/shapes] [--data_dir DIR]

prints the prepared dataset's directory (pass it as `--dataset` to `magicvideo_jax.eval.flicker`).
"""

import argparse
import csv
import os
import sys
from typing import Optional, Sequence

import numpy as np

from magicvideo_jax import video_io
from magicvideo_jax.data import moving_shapes, video_folder
from magicvideo_jax.eval import shapes
from magicvideo_jax.sampling.pipeline import MagicVideoPipeline


def write_clips(output_dir: str, videos: np.ndarray, captions: Sequence[str], fps: float,
                quality: float) -> str:
  """uint8 `[N, F, H, W, 3]` -> `clip_00000.mp4`, ... and `captions.csv`; returns the CSV path."""
  os.makedirs(output_dir, exist_ok=True)
  csv_path = os.path.join(output_dir, 'captions.csv')
  with open(csv_path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['path', 'caption'])
    for i, (video, caption) in enumerate(zip(videos, captions)):
      name = f'clip_{i:05d}.mp4'
      video_io.write_video(os.path.join(output_dir, name), video, fps=fps, quality=quality)
      writer.writerow([name, caption])
  return csv_path


def shapes_clips(split: str, num_clips: int, checkpoint: Optional[str] = None):
  """(videos uint8 [N, F, H, W, 3], captions, fps) of a moving_shapes split, or sampled for its
  captions from `checkpoint`."""
  config = moving_shapes.MovingShapesConfig(name='default')
  examples = [moving_shapes.make_example(split, i, config) for i in range(num_clips)]
  captions = [e['caption'].decode() if isinstance(e['caption'], bytes) else str(e['caption'])
              for e in examples]
  if checkpoint is None:
    return np.stack([e['video'] for e in examples]), captions, float(examples[0]['fps'])
  pipe = MagicVideoPipeline.from_pretrained(checkpoint)
  videos = shapes.generate(pipe, captions)
  return videos, captions, float(pipe.config.data.fps)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--output_dir', required=True, help='where the mp4 files and CSV go')
  parser.add_argument('--split', default='test', help='moving_shapes split (clips or captions)')
  parser.add_argument('--num_clips', type=int, default=64)
  parser.add_argument('--quality', type=float, default=3, help='imageio-ffmpeg quality, 0-10')
  parser.add_argument('--checkpoint', default=None, help='sample the clips from this model')
  parser.add_argument('--data_dir', default=None, help='TFDS data dir of the built dataset')
  args = parser.parse_args(argv)
  videos, captions, fps = shapes_clips(args.split, args.num_clips, args.checkpoint)
  csv_path = write_clips(args.output_dir, videos, captions, fps, args.quality)
  frames, resolution = videos.shape[1], videos.shape[2]
  builder = video_folder.VideoFolder(video_dir=args.output_dir, csv_path=csv_path,
                                     num_frames=frames, min_frames=frames, resolution=resolution,
                                     data_dir=args.data_dir)
  builder.download_and_prepare()
  skipped = (builder.build_report or {}).get('skipped', [])
  if skipped:
    print(f'warning: {len(skipped)} files skipped: {skipped[:3]}', file=sys.stderr)
  print(f'{builder.info.splits["train"].num_examples} clips in {builder.data_dir}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
