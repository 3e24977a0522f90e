"""What the absl console scripts (`magicvideo-train`, `magicvideo-flops`) do before parsing flags."""

import sys

from absl import flags

from magicvideo_jax import config as config_lib


def prepare_console_script(module_name: str) -> None:
  """`--config=NAME` as the shipped config's path, and `--help` listing `module_name`'s flags (absl
  lists those of the main module, which for a console script is the installed wrapper)."""
  sys.argv = config_lib.resolve_config_flag(sys.argv)
  for flag in flags.FLAGS.get_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
