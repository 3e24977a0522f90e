"""VideoFolder / ImageFolder builders: offline builds from generated folders, bad files reported."""

import json
import os

import imageio.v3 as iio
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from magicvideo_jax.data import image_folder
from magicvideo_jax.data import video_folder

# name -> (num_frames, height, width, fps). Frame t is a flat colour with value 8 * t.
GOOD_VIDEOS = {'a.mp4': (20, 40, 56, 10), 'b.mp4': (24, 48, 48, 24), 'c.mp4': (12, 64, 48, 8)}
BAD_VIDEOS = ('truncated.mp4', 'not_a_video.mp4', 'empty.mp4')
COLOUR_TOL = 6  # Lossy H.264 on flat frames.


def flat_video(num_frames, height, width):
  values = (8 * np.arange(num_frames)).astype(np.uint8)
  return np.broadcast_to(values[:, None, None, None], (num_frames, height, width, 3)).copy()


@pytest.fixture(scope='module')
def video_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('videos')
  for name, (t, h, w, fps) in GOOD_VIDEOS.items():
    iio.imwrite(root / name, flat_video(t, h, w), plugin='pyav', codec='libx264', fps=fps)
  data = (root / 'a.mp4').read_bytes()
  (root / 'truncated.mp4').write_bytes(data[:len(data) // 2])
  (root / 'not_a_video.mp4').write_text('this is text, not a video\n' * 20)
  (root / 'empty.mp4').write_bytes(b'')
  iio.imwrite(root / 'short.mp4', flat_video(3, 32, 32), plugin='pyav', codec='libx264', fps=10)
  captions = {name: f'caption of {name}, with a comma' for name in GOOD_VIDEOS}
  rows = list(GOOD_VIDEOS) + list(BAD_VIDEOS) + ['short.mp4', 'missing.mp4']
  with open(root / 'captions.csv', 'w') as f:
    f.write('path,caption\n')
    for name in rows:
      f.write(f'{name},"{captions.get(name, "bad")}"\n')
  # The same folder in WebVid's layout: <videoid>.mp4, caption in `name`.
  with open(root / 'results_webvid.csv', 'w') as f:
    f.write('videoid,contentUrl,duration,page_dir,name\n')
    for name in rows:
      caption = captions.get(name, 'bad')
      f.write(f'{name[:-4]},http://x/{name},PT00H00M10S,000001_000050,"{caption}"\n')
  return root, captions


def build(tmp_path, **kwargs):
  builder = video_folder.VideoFolder(data_dir=str(tmp_path / 'tfds'), num_workers=2, **kwargs)
  builder.download_and_prepare()
  return builder


def read_all(builder):
  source = builder.as_data_source(split='train')
  return {e['filename'].decode(): e for e in (source[i] for i in range(len(source)))}


def check_report(builder, expect_skipped):
  report = builder.build_report
  with open(os.path.join(builder.data_dir, 'build_report.json')) as f:
    assert json.load(f) == report
  print(json.dumps(report['skipped'], indent=1))
  assert {s['file']: s['reason'] for s in report['skipped']} == expect_skipped
  return report


@pytest.mark.parametrize('layout', ['plain', 'webvid'])
def test_video_folder_builds_good_and_reports_bad(video_dir, tmp_path, layout):
  root, captions = video_dir
  csv_path = root / ('captions.csv' if layout == 'plain' else 'results_webvid.csv')
  builder = build(tmp_path, video_dir=str(root), csv_path=str(csv_path), num_frames=16,
                  min_frames=8, resolution=32)
  examples = read_all(builder)
  assert sorted(examples) == sorted(GOOD_VIDEOS)
  for name, (t, _, _, fps) in GOOD_VIDEOS.items():
    e = examples[name]
    assert e['caption'].decode() == captions[name]
    assert e['fps'] == pytest.approx(fps)
    assert e['video'].dtype == np.uint8 and e['video'].shape == (min(t, 16), 32, 32, 3)
    colours = e['video'].reshape(e['video'].shape[0], -1).mean(-1)
    np.testing.assert_allclose(colours, 8 * np.arange(min(t, 16)), atol=COLOUR_TOL)
  report = check_report(builder, {'truncated.mp4': 'unreadable', 'not_a_video.mp4': 'unreadable',
                                  'empty.mp4': 'empty', 'short.mp4': 'too_short',
                                  'missing.mp4': 'missing'})
  assert report['num_examples'] == 3 and report['num_rows'] == 8
  # Read back from the files alone, as the input pipeline does.
  ro = tfds.builder_from_directory(builder.data_dir).as_data_source(split='train')
  assert len(ro) == 3 and ro[0]['video'].shape[1:] == (32, 32, 3)


def test_video_folder_options(video_dir, tmp_path):
  root, _ = video_dir
  builder = build(tmp_path, video_dir=str(root), num_frames=4, min_frames=2, resolution=24,
                  resize_mode='shorter_side', max_fps=12, clips_per_video=2, name='opts')
  assert builder.builder_config.name == 'opts'
  # Found by name in data_dir from the prepared files alone.
  source = tfds.data_source('video_folder/opts', data_dir=str(tmp_path / 'tfds'), split='train')
  clips = {}
  for i in range(len(source)):
    e = source[i]
    clips.setdefault(e['filename'].decode(), []).append(e)
  assert sorted(clips) == sorted(GOOD_VIDEOS) + ['short.mp4']  # 3 frames >= min_frames.
  # b.mp4: 24 fps > max_fps 12 -> every 2nd frame, 12 fps; 48x48 -> 24x24; two 4-frame clips.
  b = sorted(clips['b.mp4'], key=lambda e: e['video'].mean())
  assert [e['video'].shape for e in b] == [(4, 24, 24, 3)] * 2
  assert all(e['fps'] == pytest.approx(12.0) for e in b)
  colours = np.concatenate([e['video'].reshape(4, -1).mean(-1) for e in b])
  np.testing.assert_allclose(colours, 8 * np.arange(0, 16, 2), atol=COLOUR_TOL)
  # a.mp4 (10 fps, 40x56): kept at 10 fps, aspect ratio kept: 24x34.
  assert {e['video'].shape for e in clips['a.mp4']} == {(4, 24, 34, 3)}
  assert all(e['fps'] == pytest.approx(10.0) for e in clips['a.mp4'])
  # c.mp4 (8 fps, 64x48 portrait): 32x24.
  assert {e['video'].shape for e in clips['c.mp4']} == {(4, 32, 24, 3)}


def test_video_folder_second_prepare_is_a_noop(video_dir, tmp_path):
  root, _ = video_dir
  first = build(tmp_path, video_dir=str(root), num_frames=8, min_frames=8, resolution=16)
  again = build(tmp_path, video_dir=str(root), num_frames=8, min_frames=8, resolution=16)
  assert again.data_dir == first.data_dir
  assert again.build_report == first.build_report


def test_image_folder_builds_good_and_reports_bad(tmp_path):
  root = tmp_path / 'images'
  root.mkdir()
  rng = np.random.default_rng(0)
  good = {'red.png': (40, 60, (255, 0, 0)), 'green.jpg': (50, 50, (0, 255, 0)),
          'sub/blue.png': (70, 30, (0, 0, 255))}
  (root / 'sub').mkdir()
  for name, (h, w, colour) in good.items():
    Image.fromarray(np.full((h, w, 3), colour, np.uint8)).save(root / name)
  noise = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))
  noise.save(root / 'full.png')
  data = (root / 'full.png').read_bytes()
  (root / 'truncated.png').write_bytes(data[:len(data) // 3])
  (root / 'text.png').write_text('not an image')
  (root / 'empty.jpg').write_bytes(b'')
  names = list(good) + ['truncated.png', 'text.png', 'empty.jpg', 'missing.png']
  with open(root / 'captions.csv', 'w') as f:
    f.write('path,caption\n' + ''.join(f'{n},{n[:-4]} square\n' for n in names))
  builder = image_folder.ImageFolder(image_dir=str(root), resolution=16,
                                     data_dir=str(tmp_path / 'tfds'))
  builder.download_and_prepare()
  source = builder.as_data_source(split='train')
  examples = {e['filename'].decode(): e for e in (source[i] for i in range(len(source)))}
  assert sorted(examples) == sorted(good)
  for name, (_, _, colour) in good.items():
    e = examples[name]
    assert e['image'].shape == (16, 16, 3) and e['image'].dtype == np.uint8
    np.testing.assert_allclose(e['image'].reshape(-1, 3).mean(0), colour, atol=3)
    assert e['caption'].decode() == f'{name[:-4]} square'
  check_report(builder, {'truncated.png': 'unreadable', 'text.png': 'unreadable',
                         'empty.jpg': 'empty', 'missing.png': 'missing'})


def test_bad_csv_header_says_what_is_expected(tmp_path):
  (tmp_path / 'captions.csv').write_text('file,text\nx.mp4,hello\n')
  builder = video_folder.VideoFolder(video_dir=str(tmp_path), data_dir=str(tmp_path / 'tfds'))
  with pytest.raises(ValueError, match='path,caption'):
    builder.download_and_prepare()


def test_a_folder_of_only_bad_files_says_why(video_dir, tmp_path):
  root, _ = video_dir
  with open(tmp_path / 'bad.csv', 'w') as f:
    f.write('path,caption\n')
    for name in BAD_VIDEOS + ('missing.mp4',):
      f.write(f'{name},bad\n')
  with pytest.raises(video_folder.NoUsableFilesError,
                     match=r"no usable file among the 4 rows: skipped by reason .*'unreadable': 2"):
    build(tmp_path, video_dir=str(root), csv_path=str(tmp_path / 'bad.csv'), num_frames=16,
          min_frames=8, resolution=32)
