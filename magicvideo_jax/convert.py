r"""Weight import from diffusers / transformers folders (safetensors) and export back.

    python -m magicvideo_jax.convert --diffusers_dir SRC --output DST [--num_frames 16]
    python -m magicvideo_jax.convert --export_from DST --output OUT [--reference_dir SRC]
    python -m magicvideo_jax.convert --export_lora_from RUN --output LORA_DIR
    python -m magicvideo_jax.convert --diffusers_dir SRC --motion_adapter_dir MA --output DST
    python -m magicvideo_jax.convert --export_motion_adapter DST --output MA_OUT

The conversion itself is `magicvideo_jax.weights.convert`; see its docstring for the layouts.
"""

import argparse
import os
import sys

from magicvideo_jax import lora as lora_lib
from magicvideo_jax.weights import checkpoint as ckpt_lib
from magicvideo_jax.weights import lora_io
from magicvideo_jax.weights import motion_adapter
from magicvideo_jax.weights.convert import convert_diffusers_folder, export_diffusers
from magicvideo_jax.weights.torch_layout import ConversionError, refuse_pickle_args


MOTION_ADAPTER_DIR = 'motion_adapter'  # An AnimateDiff model's export: its MotionAdapter folder.


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
  parser.add_argument('--motion_adapter_dir', help='with --diffusers_dir: a diffusers MotionAdapter '
                      'folder (AnimateDiff) whose motion modules to add (weights/motion_adapter.py)')
  parser.add_argument('--export_motion_adapter', help='our checkpoint folder (or workdir) whose '
                      'AnimateDiff motion modules to write as a diffusers MotionAdapter folder')
  args = parser.parse_args(argv)
  if sum(map(bool, (args.diffusers_dir, args.export_from, args.export_lora_from,
                    args.export_motion_adapter))) != 1:
    parser.error('give exactly one of --diffusers_dir (import), --export_from (export), '
                 '--export_lora_from (LoRA export) or --export_motion_adapter')
  if args.motion_adapter_dir and not args.diffusers_dir:
    parser.error('--motion_adapter_dir needs --diffusers_dir (the SD model it animates)')
  try:
    refuse_pickle_args(args.diffusers_dir, args.export_from, args.reference_dir,
                       args.motion_adapter_dir, args.export_motion_adapter)
    if args.export_motion_adapter:
      folder = ckpt_lib.model_folder(args.export_motion_adapter) or args.export_motion_adapter
      config, params, _ = ckpt_lib.load_pretrained(folder)
      params = lora_lib.fold(params, lora_lib.scale(config))
      count = motion_adapter.export_motion_adapter(params['unet'], config.model.unet.to_dict(),
                                                   args.output)
      print(f'motion adapter: {count} tensors', file=sys.stderr)
      print(os.path.abspath(args.output))
      return
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
      if args.motion_adapter_dir:
        config, params, tokenizer = motion_adapter.convert_with_motion_adapter(
            args.diffusers_dir, args.motion_adapter_dir, args.num_frames)
      else:
        config, params, tokenizer = convert_diffusers_folder(args.diffusers_dir, args.num_frames)
      ckpt_lib.save_pretrained(args.output, config, params, tokenizer)
    else:
      folder = ckpt_lib.model_folder(args.export_from) or args.export_from
      config, params, tokenizer = ckpt_lib.load_pretrained(folder)
      params = lora_lib.fold(params, lora_lib.scale(config))  # A LoRA run's adapters added.
      export_diffusers(params, config, args.output, args.reference_dir, tokenizer)
      if config.model.unet.get('temporal_attention') == 'animatediff':  # Also diffusers' own form.
        motion_adapter.export_motion_adapter(params['unet'], config.model.unet.to_dict(),
                                             os.path.join(args.output, MOTION_ADAPTER_DIR))
    print(os.path.abspath(args.output))
  except (ConversionError, FileNotFoundError, ValueError) as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  main()
