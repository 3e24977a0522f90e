r"""Weight import from diffusers / transformers folders (safetensors) and export back.

    python -m magicvideo_jax.convert --diffusers_dir SRC --output DST [--num_frames 16]
    python -m magicvideo_jax.convert --export_from DST --output OUT [--reference_dir SRC]
    python -m magicvideo_jax.convert --export_lora_from RUN --output LORA_DIR

The conversion itself is `magicvideo_jax.weights.convert`; see its docstring for the layouts.
"""

import argparse
import os
import sys

from magicvideo_jax import lora as lora_lib
from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax.weights import lora_io
from magicvideo_jax.weights.convert import convert_diffusers_folder, export_diffusers
from magicvideo_jax.weights.torch_layout import ConversionError, refuse_pickle_args


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
  parser.add_argument('--export_lora_from', help='a LoRA training run (workdir or checkpoint folder) '
                      'whose adapters to write as diffusers / PEFT safetensors (weights/lora_io.py)')
  args = parser.parse_args(argv)
  if sum(map(bool, (args.diffusers_dir, args.export_from, args.export_lora_from))) != 1:
    parser.error('give exactly one of --diffusers_dir (import), --export_from (export) or '
                 '--export_lora_from (LoRA export)')
  try:
    refuse_pickle_args(args.diffusers_dir, args.export_from, args.reference_dir)
    if args.export_lora_from:
      folder = ckpt_lib.model_folder(args.export_lora_from) or args.export_lora_from
      config, params, _ = ckpt_lib.load_pretrained(folder)
      written = lora_io.export_from_run(params, config, args.output)
      print(', '.join(f'{name}: {n} tensors' for name, n in written.items()), file=sys.stderr)
      print(os.path.abspath(args.output))
      return
    if args.diffusers_dir:
      if args.num_frames < 1:
        raise ConversionError(f'--num_frames={args.num_frames} must be >= 1')
      config, params, tokenizer = convert_diffusers_folder(args.diffusers_dir, args.num_frames)
      ckpt_lib.save_pretrained(args.output, config, params, tokenizer)
    else:
      folder = ckpt_lib.model_folder(args.export_from) or args.export_from
      config, params, tokenizer = ckpt_lib.load_pretrained(folder)
      params = lora_lib.fold(params, lora_lib.scale(config))  # A LoRA run's adapters added.
      export_diffusers(params, config, args.output, args.reference_dir, tokenizer)
    print(os.path.abspath(args.output))
  except (ConversionError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  main()
