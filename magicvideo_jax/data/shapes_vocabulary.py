"""The moving_shapes world: its colours, shapes and motions (plain Python, read without TFDS)."""

from typing import Dict, Tuple

COLOURS: Dict[str, Tuple[int, int, int]] = {
    'red': (220, 40, 40),
    'green': (40, 200, 60),
    'blue': (40, 70, 250),
    'yellow': (235, 215, 40),
    'cyan': (40, 210, 225),
    'magenta': (215, 60, 215),
    'white': (235, 235, 235),
}
SHAPES: Tuple[str, ...] = ('circle', 'square', 'triangle', 'star')
MOTIONS: Tuple[str, ...] = ('left', 'right', 'up', 'down', 'growing')
COLOUR_NAMES: Tuple[str, ...] = tuple(COLOURS)
SPLITS: Tuple[str, ...] = ('train', 'validation', 'test')
