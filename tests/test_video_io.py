"""Video files are verified before they take their name; a failed write leaves nothing behind."""

import errno
import os

import numpy as np
import pytest

from magicvideo_jax import sample
from magicvideo_jax import video_io

FRAMES = np.random.default_rng(0).integers(0, 255, (5, 16, 18, 3)).astype(np.uint8)


@pytest.mark.parametrize('ext', ['.mp4', '.gif'])
def test_round_trip(tmp_path, ext):
  path = video_io.write_video(str(tmp_path / f'a{ext}'), FRAMES, fps=8.0)
  assert video_io.read_video(path).shape == FRAMES.shape
  assert os.listdir(tmp_path) == [f'a{ext}']  # No temporary file left.


def test_a_directory_or_a_file_as_folder_is_refused(tmp_path):
  (tmp_path / 'dir.mp4').mkdir()
  with pytest.raises(video_io.VideoWriteError, match='dir.mp4: not written: it is a directory'):
    video_io.write_video(str(tmp_path / 'dir.mp4'), FRAMES)
  (tmp_path / 'file').write_text('x')
  with pytest.raises(video_io.VideoWriteError, match='not written'):
    video_io.write_video(str(tmp_path / 'file' / 'a.mp4'), FRAMES)
  assert sorted(os.listdir(tmp_path)) == ['dir.mp4', 'file']


def test_disk_full_leaves_no_partial_file(tmp_path, monkeypatch):
  def full_disk(path, *args, **kwargs):
    with open(path, 'wb') as f:
      f.write(b'\0' * 4096)  # What ffmpeg leaves when the disk fills.
    raise OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(video_io.iio, 'imwrite', full_disk)
  for ext in ('.mp4', '.gif'):
    with pytest.raises(video_io.VideoWriteError, match=rf'a{ext}: not written: .*No space left'):
      video_io.write_video(str(tmp_path / f'a{ext}'), FRAMES)
  assert os.listdir(tmp_path) == []


def test_a_file_that_does_not_read_back_is_removed(tmp_path, monkeypatch):
  monkeypatch.setattr(video_io, '_encode', lambda path, *a: open(path, 'wb').write(b'not a video'))
  with pytest.raises(video_io.VideoWriteError, match='does not read back'):
    video_io.write_video(str(tmp_path / 'a.mp4'), FRAMES)
  # A file with too few frames is refused too.
  monkeypatch.setattr(video_io, '_encode',
                      lambda path, frames, *a: video_io.iio.imwrite(path, frames[:2], fps=8))
  with pytest.raises(video_io.VideoWriteError, match='reads back as 2 frames'):
    video_io.write_video(str(tmp_path / 'a.mp4'), FRAMES)
  assert os.listdir(tmp_path) == []


def test_bad_arguments_before_any_work(tmp_path):
  for frames, fps, name, match in [(FRAMES, float('nan'), 'a.mp4', 'fps=nan'),
                                   (FRAMES, 0.0, 'a.mp4', 'fps=0.0'),
                                   (FRAMES[0], 8.0, 'a.mp4', r'expected frames \[F, H, W, 3\]'),
                                   (FRAMES, 8.0, 'a.avi', "'.avi'")]:
    with pytest.raises(ValueError, match=match):
      video_io.write_video(str(tmp_path / name), frames, fps=fps)
  assert os.listdir(tmp_path) == []


def test_sample_cli_refuses_unwritable_outputs_before_sampling(tmp_path, capsys):
  (tmp_path / 'out.mp4').mkdir()
  (tmp_path / 'file').write_text('x')
  checkpoint = str(tmp_path)  # Never loaded: the flags fail first.
  for output, match in [(tmp_path / 'out.mp4', 'is a directory'),
                        (tmp_path / 'file' / 'x.mp4', 'not a writable folder')]:
    code = sample.main(['--checkpoint', checkpoint, '--prompt', 'a', '--output', str(output)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], err
