r"""Weight import from diffusers / transformers folders (safetensors) and export back.

    python -m magicvideo_jax.convert --diffusers_dir SRC --output DST [--num_frames 16]
    python -m magicvideo_jax.convert --export_from DST --output OUT [--reference_dir SRC]

The conversion itself is `magicvideo_jax.weights.convert`; see its docstring for the layouts.
"""

import argparse
import os

from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax.weights.convert import ConversionError, convert_diffusers_folder, export_diffusers
from magicvideo_jax.weights.torch_layout import refuse_pickle_args


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog='python -m magicvideo_jax.convert',
      description='Convert a diffusers SD folder (safetensors) to a magicvideo_jax checkpoint folder '
                  '(params + model config + tokenizer; video layers at identity init), or export our '
                  'image-part weights back to diffusers safetensors. Pickle files (.ckpt, .bin, .pt) '
                  'are refused.')
  parser.add_argument('--diffusers_dir', help='diffusers folder to import (unet/, vae/, text_encoder/, '
                      'tokenizer/, scheduler/)')
  parser.add_argument('--output', required=True, help='folder to write')
  parser.add_argument('--num_frames', type=int, default=16,
                      help='import: frames the video layers support (adaptor rows)')
  parser.add_argument('--export_from', help='our checkpoint folder to export as diffusers safetensors')
  parser.add_argument('--reference_dir', help='with --export_from: the diffusers folder whose configs, '
                      'tensor layouts and key style to reuse')
  args = parser.parse_args(argv)
  if bool(args.diffusers_dir) == bool(args.export_from):
    parser.error('give exactly one of --diffusers_dir (import) or --export_from (export)')
  try:
    refuse_pickle_args(args.diffusers_dir, args.export_from, args.reference_dir)
    if args.diffusers_dir:
      if args.num_frames < 1:
        raise ConversionError(f'--num_frames={args.num_frames} must be >= 1')
      config, params, tokenizer = convert_diffusers_folder(args.diffusers_dir, args.num_frames)
      ckpt_lib.save_pretrained(args.output, config, params, tokenizer)
    else:
      folder = args.export_from
      if not ckpt_lib.is_pretrained_folder(folder) and ckpt_lib.is_pretrained_folder(
          os.path.join(folder, 'model')):  # A training workdir: its exported model.
        folder = os.path.join(folder, 'model')
      config, params, tokenizer = ckpt_lib.load_pretrained(folder)
      export_diffusers(params, config, args.output, args.reference_dir, tokenizer)
    print(os.path.abspath(args.output))
  except (ConversionError, FileNotFoundError) as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  main()
