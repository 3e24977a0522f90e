r"""Generates notebooks/magicvideo_colab.ipynb, the Colab notebook of magicvideo_jax.

The notebook is written from this script so that it is reproducible from code and reviewable as a diff;
do not edit the .ipynb by hand. After changing a cell here, regenerate it (from the repository root):

  .venv/bin/python notebooks/make_colab.py            # writes notebooks/magicvideo_colab.ipynb
  .venv/bin/python notebooks/make_colab.py --check    # exit 1 if the .ipynb is out of date

tests/test_notebook.py checks that the committed notebook equals `build_notebook()` and executes it
headless on CPU (nbclient), shrunk through the MAGICVIDEO_* environment variables read in the
parameters cell.

The notebook is stored without outputs: Colab, Jupyter and the test run it from scratch.
"""

import argparse
import os
import sys

import nbformat
from nbformat import v4

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'magicvideo_colab.ipynb')

# --------------------------------------------------------------------------------------------------
# The cells, in order: (kind, source). Code cells keep the project's 2-space indentation and short
# lines (they are read in a browser).

INTRO = r"""# MagicVideo in JAX: text-to-video on TPU, GPU or CPU

**MagicVideo** (Zhou et al., [arXiv 2211.11018](https://arxiv.org/abs/2211.11018)) generates video by
*latent diffusion*, reusing a text-to-image Stable Diffusion (SD) model almost unchanged:

- **Latent space.** Every frame is encoded on its own by SD's VAE (8x downsampling, 4 channels:
  256x256 pixels become 32x32x4 latents); the denoiser works on 16 such latent frames and the VAE
  decodes them back.
- **Denoiser.** SD's 2D U-Net runs on every frame (frames folded into the batch), every 2D convolution
  initialised from the image model. There are no 3D convolutions; three small additions make it a
  video model:
  - a **frame-wise adaptor** after each 2D convolution, one scale and shift per frame index $i$:
    $z_i \leftarrow S_i \odot \mathrm{Conv2d}(z_i) + B_i$ (identity at initialisation:
    $S = 1$, $B = 0$);
  - **directed temporal attention**, run *in parallel* with the spatial attention and summed,
    $z \leftarrow \mathrm{S\text{-}Attn}(z) + \mathrm{T\text{-}Attn}(z)$: at each pixel the frames form
    a sequence and frame $p$ attends only to frames $q \le p$ (the lower-triangular mask drawn below);
  - **fps conditioning**: a sinusoidal embedding of the frame rate, through Linear-SiLU-Linear, is
    added to the timestep embedding, so the frame rate asked for at sampling time steers smoothness.
- **Text.** A CLIP text encoder conditions the U-Net through cross-attention; sampling runs DDIM (or
  DPM-Solver++) with classifier-free guidance, the whole loop in one `jax.jit`.

This notebook installs `magicvideo_jax`, loads the **bundled shapes checkpoint** (MagicVideo's recipe in
miniature, trained on the *moving shapes* dataset: 16 frames of 32x32, prompts such as *"a red circle
moving left"*; see `magicvideo_jax/assets/shapes/PROVENANCE.md`), samples a video from your prompt,
shows and saves it, lets an automatic judge read colour, shape and motion back from the pixels, and
counts FLOPs. Any runtime works (*Runtime > Change runtime type*): CPU takes about a minute, a GPU or
TPU seconds. Point `checkpoint` at a Stable Diffusion folder converted with
`python -m magicvideo_jax.convert` (or a diffusers folder) to sample at 256x256."""

INSTALL_MD = r"""## 1. Install

On Colab this cell `pip install`s the repository: from the clone when the notebook runs inside one
(`pip install -e`), else from `REPO_URL` (set it to the repository's git address). On a GPU or TPU
runtime it adds the matching `jax[cuda12]` / `jax[tpu]`. Anywhere else (a clone with its `.venv`) it
installs nothing and only makes the clone importable. If it reports that `numpy` or `jax` changed
version, restart the session (*Runtime > Restart session*) and run the notebook again: the second time
it finds the package installed and does nothing."""

INSTALL = r"""# @title Install magicvideo_jax
import glob, importlib, importlib.metadata, importlib.util, os, shutil, subprocess, sys

REPO_URL = ""  # @param {type:"string"}
IN_COLAB = "google.colab" in sys.modules


def find_clone(path):
  # The repository root at or above `path` (pyproject.toml + magicvideo_jax/), or None.
  path = os.path.abspath(path)
  while not (os.path.isfile(os.path.join(path, "pyproject.toml"))
             and os.path.isdir(os.path.join(path, "magicvideo_jax"))):
    if os.path.dirname(path) == path:
      return None
    path = os.path.dirname(path)
  return path


clone = find_clone(os.getcwd()) or find_clone("/content/magicvideo_jax")
installed = importlib.util.find_spec("magicvideo_jax") is not None
if IN_COLAB and not installed:
  if not (clone or REPO_URL):
    raise ValueError("Set REPO_URL to the magicvideo_jax git repository, or clone it "
                     "to /content/magicvideo_jax, then run this cell again.")
  loaded = {m: sys.modules[m].__version__ for m in ("numpy", "jax") if m in sys.modules}
  pip = [sys.executable, "-m", "pip", "install", "-q"]
  subprocess.run(pip + (["-e", clone] if clone else [f"git+{REPO_URL}"]), check=True)
  jax_version = importlib.metadata.version("jax")
  if shutil.which("nvidia-smi"):
    subprocess.run(pip + [f"jax[cuda12]=={jax_version}"], check=True)
  elif glob.glob("/dev/accel*") or "COLAB_TPU_ADDR" in os.environ:
    subprocess.run(pip + [f"jax[tpu]=={jax_version}"], check=True)
  changed = [m for m, v in loaded.items() if importlib.metadata.version(m) != v]
  if changed:
    print(f"{', '.join(changed)} changed version: restart the session (Runtime > Restart "
          "session) and run the notebook again.")
  importlib.invalidate_caches()
if clone and clone not in sys.path:
  sys.path.insert(0, clone)  # An editable install is only seen by new processes.
spec = importlib.util.find_spec("magicvideo_jax")
if spec is None:
  raise ModuleNotFoundError("magicvideo_jax is not installed: pip install the repository, or open "
                            "this notebook inside a clone of it.")
print("magicvideo_jax from", os.path.dirname(spec.origin))"""

IMPORTS = r"""import base64, os, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow is imported by the judge's dataset.

import jax
import numpy as np
from IPython.display import HTML, Markdown, display
from PIL import Image as PILImage

from magicvideo_jax import MagicVideoPipeline, video_io
from magicvideo_jax.demo import DEFAULT_CHECKPOINT

print(f"jax {jax.__version__}, backend {jax.default_backend()}: {jax.devices()}")"""

MASK_MD = r"""## 2. Directed temporal attention

The mask of the temporal attention over 16 frames, from the model code
(`magicvideo_jax.models.unet.temporal_masks`): row $p$ is the query frame, column $q$ the key frame;
light cells may attend. Frame $p$ sees itself and the frames before it, never the future, so the first
frames of a clip are generated without looking at the last ones. The mask is applied before the softmax
(`temporal_mask='causal'`, exactly causal); `'causal_post_softmax'` is the paper's literal "multiply the
attention map by a lower-triangular mask" (not renormalised)."""

MASK = r"""from magicvideo_jax.models.unet import temporal_masks

attend, _ = temporal_masks(16, "causal", None)  # [1, 1, F, F]; True: row frame may attend column frame.
mask = np.asarray(attend[0, 0])
print("\n".join(" ".join("#" if m else "." for m in row) for row in mask))
cell = 16  # Pixels per mask entry, with a 1-pixel grid line.
pixels = np.where(mask, 235, 40).astype(np.uint8).repeat(cell, 0).repeat(cell, 1)
pixels[::cell, :] = pixels[:, ::cell] = 128
display(PILImage.fromarray(pixels))"""

PARAMS_MD = r"""## 3. Parameters

`checkpoint` empty means the bundled shapes checkpoint. The shapes model knows the colours red, green,
blue, yellow, cyan, magenta and white, the shapes circle, square, triangle and star, and the motions
moving left / right / up / down and growing (some combinations were held out of its training, to test
whether it composes them). `resolution` 0 means the checkpoint's training resolution; `fps`
is both the frame-rate conditioning and the frame rate of the saved files. The `MAGICVIDEO_*`
environment variables override the form (the repository's test uses them to shrink the run)."""

PARAMS = r"""# @title Parameters
checkpoint = ""  # @param {type:"string"}
prompt = "a red circle moving left"  # @param {type:"string"}
negative_prompt = ""  # @param {type:"string"}
num_frames = 16  # @param {type:"integer"}
resolution = 0  # @param {type:"integer"}
steps = 25  # @param {type:"integer"}
guidance_scale = 4.0  # @param {type:"number"}
fps = 8.0  # @param {type:"number"}
seed = 0  # @param {type:"integer"}
output = "outputs/magicvideo.mp4"  # @param {type:"string"}


def env(name, value):  # MAGICVIDEO_<NAME> overrides a parameter.
  return type(value)(os.environ.get(f"MAGICVIDEO_{name}", value))


checkpoint = env("CHECKPOINT", checkpoint) or DEFAULT_CHECKPOINT
prompt, steps, seed = env("PROMPT", prompt), env("STEPS", steps), env("SEED", seed)
num_frames, output = env("NUM_FRAMES", num_frames), env("OUTPUT", output)
print(f"checkpoint {checkpoint}\nprompt {prompt!r}, {num_frames} frames, {steps} steps, seed {seed}")"""

LOAD_MD = r"""## 4. Load the pipeline and sample

`MagicVideoPipeline.from_pretrained` reads a checkpoint folder (this project's export, a training
workdir, or a diffusers Stable Diffusion folder, converted on the fly). The first call compiles the text
encoder and the whole denoising loop into one program (and the VAE decode into a second); later calls
with new prompts, seeds or guidance scales reuse them."""

LOAD = r"""pipe = MagicVideoPipeline.from_pretrained(checkpoint)
cfg = pipe.config
resolution = resolution or int(cfg.data.get("resolution", 256))
if pipe.max_frames and num_frames > pipe.max_frames:
  print(f"this model supports at most {pipe.max_frames} frames: using {pipe.max_frames}")
  num_frames = pipe.max_frames
print(f"{resolution}x{resolution}, {num_frames} frames; video layers: frame adaptor "
      f"{cfg.model.unet.frame_adaptor}, temporal attention {cfg.model.unet.temporal_attention!r} "
      f"(mask {cfg.model.unet.temporal_mask!r}), fps embedding {cfg.model.unet.fps_embedding}")"""

SAMPLE = r"""t0 = time.time()
video = pipe(prompt, negative_prompt=negative_prompt or None, num_frames=num_frames,
             height=resolution, width=resolution, num_inference_steps=steps,
             guidance_scale=guidance_scale, fps=fps, seed=seed)[0]  # [F, H, W, 3] uint8
print(f"video {video.shape} in {time.time() - t0:.1f} s (the first call includes compilation: "
      "run the cell again with another seed to see the sampling time alone)")"""

SHOW_MD = r"""## 5. Show and save

Small videos are enlarged (nearest neighbour) for viewing; the .mp4 and .gif are written next to the
notebook (on Colab: the *Files* pane, `/content/outputs`)."""

SHOW = r"""scale = max(1, 256 // max(video.shape[1:3]))
big = video_io.upscale_nearest(video, scale)
mp4 = video_io.write_video(output, big, fps)
gif = video_io.write_video(os.path.splitext(output)[0] + ".gif", big, fps)
print(f"wrote {mp4} and {gif}: {big.shape[0]} frames of {big.shape[2]}x{big.shape[1]}")
with open(gif, "rb") as f:  # An <img> plays the GIF in every notebook frontend.
  display(HTML(f'<img src="data:image/gif;base64,{base64.b64encode(f.read()).decode()}">'))
strip = video_io.upscale_nearest(np.concatenate(list(video[::2]), axis=1), max(1, scale // 2))
display(PILImage.fromarray(strip))  # Every other frame, left to right."""

JUDGE_MD = r"""## 6. What the judge sees

For moving-shapes prompts, `magicvideo_jax.eval.judge` segments the object in every frame and reads
back its colour (nearest palette colour), shape (from scale-free mask features) and motion (centroid
trend, or growing area), plus a temporal consistency score in [0, 1]. The repository's evaluation
(`python -m magicvideo_jax.eval.shapes`) runs it over held-out prompts; here it checks your one video."""

JUDGE = r"""from magicvideo_jax.eval import judge
from magicvideo_jax.data import moving_shapes

asked = dict(zip(("colour", "shape", "motion"), moving_shapes.parse_caption(prompt)))
if all(asked.values()):
  scores = judge.score(video[None], [prompt])
  seen = scores["judgements"][0]
  rows = [f"| {k} | {asked[k]} | {seen[k] or '-'} | {'yes' if asked[k] == seen[k] else 'no'} |"
          for k in asked]
  display(Markdown("| | prompt | judge sees | match |\n|---|---|---|---|\n" + "\n".join(rows)))
  print(f"object in {seen['present']:.0%} of frames, consistency {seen['consistency']:.2f}\n")
  print(judge.format_scores({k: v for k, v in scores.items() if k != "judgements"}, "this video"))
else:
  print(f"The judge reads moving-shapes prompts (a colour, a shape and a motion); {prompt!r} "
        f"names {asked}.")"""

FLOPS_MD = r"""## 7. FLOPs

`magicvideo_jax.flops.count_flops` compiles the denoiser forward, the VAE decode and the text encoder
from abstract inputs (nothing is allocated or run) and reads XLA's count, beside an analytic count from
the config alone. XLA counts a multiply-add as 2 FLOPs (fvcore, used in several papers, as 1). Here:
the loaded checkpoint's model, per clip of `num_frames` frames with `steps` steps."""

FLOPS = r"""from magicvideo_jax import flops

report = flops.count_flops(cfg, frames=num_frames, steps=steps, memory=False)
print(flops.format_report(os.path.basename(os.path.normpath(checkpoint)), report))"""

PAPER_MD = r"""### MagicVideo vs VDM at paper scale

MagicVideo claims "around 64x fewer FLOPs than VDM". The table counts (analytically, instantly; the
XLA counts agree within about 0.2% at this scale, run `python -m magicvideo_jax.flops --compare` for
them) one denoiser forward on a 16-frame clip for MagicVideo (`configs/sd15_256.py`: SD 1.5 U-Net on
32x32x4 latents of 256x256 frames) and for the VDM baseline (`configs/vdm_64.py`: VDM's 'T2V large'
pixel-space U-Net at 64x64; `configs/vdm_256.py`: the same network on 256x256 pixels, and a variant
with attention only at VDM's absolute resolutions), and per clip with each model's sampling steps and
classifier-free guidance (x2)."""

PAPER = r"""import importlib


def analytic_forward(config):  # One denoiser forward, batch 1 (FLOPs, multiply-add = 2).
  frames, res = config.data.num_frames, config.data.resolution
  length = config.model.text_encoder.max_position_embeddings
  if flops.model_kind(config) == "vdm":
    return flops.analytic_vdm_flops(config.model.vdm, batch=1, frames=frames, height=res,
                                    width=res, context_len=length)["total"]
  size = flops.denoiser_io(config, 1, frames)["sample"][0][2]
  return flops.analytic_unet_flops(config.model.unet, batch=1, frames=frames, height=size,
                                   width=size, context_len=length)["total"]


rows, base = [], None
for name, path, variant in flops.COMPARE:
  config = importlib.import_module(path[:-3].replace("/", ".")).get_config(variant)
  forward = analytic_forward(config)
  clip = forward * config.sampling.num_inference_steps * 2
  base = base or (forward, clip)
  shape = "x".join(map(str, flops.denoiser_io(config, 1, 16)["sample"][0][1:]))
  rows.append(f"| {name} | {shape} | {forward / 1e12:.2f} | {forward / base[0]:.1f}x | "
              f"{config.sampling.num_inference_steps} | {clip / 1e15:.2f} | {clip / base[1]:.0f}x |")
display(Markdown("| model | denoiser input | TFLOPs / forward | vs MagicVideo | steps | "
                 "PFLOPs / clip | vs MagicVideo |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows)))"""

CMD_MD = r"""## 8. The second family: CMD

CMD (Yu et al., ICLR 2024, [arXiv 2403.14148](https://arxiv.org/abs/2403.14148)) writes a clip as one
*content frame* (an image latent, made by the image U-Net) plus a small *motion latent* (made by a
light DiT given the content frame), which its autoencoder decodes back to the clip's latents. The
bundled `shapes_cmd` checkpoint is that recipe in miniature (`configs/cmd_shapes.py`); the same
`from_pretrained` returns a `CMDPipeline` for it. Below: the prompt above, both families side by
side, and what one clip costs each (XLA FLOPs of the networks times steps and guidance, decoders
included)."""

CMD = r"""from magicvideo_jax.eval import cmd as cmd_eval
from magicvideo_jax.sampling.pipeline import CMDPipeline

cmd_dir = os.path.join(os.path.dirname(DEFAULT_CHECKPOINT), "shapes_cmd")
cmd_pipe = MagicVideoPipeline.from_pretrained(cmd_dir)
assert isinstance(cmd_pipe, CMDPipeline)
cmd_video = cmd_pipe(prompt, negative_prompt=negative_prompt or None, seed=seed)[0]
# Every fourth frame top to bottom: this checkpoint's video (when of the same size) | CMD's.
shown = np.concatenate([video, cmd_video], axis=2) if video.shape == cmd_video.shape else cmd_video
display(PILImage.fromarray(video_io.upscale_nearest(np.concatenate(list(shown[::4]), axis=0), 4)))
if all(asked.values()):
  print("CMD, judge sees:", {k: judge.score(cmd_video[None], [prompt])["judgements"][0][k]
                             for k in ("colour", "shape", "motion")})
for name, p in (("this checkpoint", pipe), ("CMD", cmd_pipe)):
  cost = cmd_eval.per_clip_flops(p)
  print(f"{name:16s} {cost['total'] / 1e9:8.2f} GFLOPs per clip: " +
        ", ".join(f"{k} {v / 1e9:.2f}" for k, v in cost.items() if k != "total"))"""

NEXT_MD = r"""## Next

```bash
python -m magicvideo_jax.sample --checkpoint CKPT --prompt "a blue square moving up" --output out.mp4
python -m magicvideo_jax.demo                        # six prompts, videos and the judge's scores
python -m magicvideo_jax.convert --diffusers_dir /path/to/sd15 --output /ckpt/sd15   # import SD
python -m magicvideo_jax.main --config=configs/sd15_256.py --workdir=/ckpt/run       # train
bash launch/train_shapes.sh                          # the recipe of the bundled checkpoint
```

See the repository's README for configs, multi-host training on TPU pods and GPU clusters, and the
parity tests against diffusers / transformers."""

CELLS = (
    ('markdown', INTRO),
    ('markdown', INSTALL_MD), ('code', INSTALL), ('code', IMPORTS),
    ('markdown', MASK_MD), ('code', MASK),
    ('markdown', PARAMS_MD), ('code', PARAMS),
    ('markdown', LOAD_MD), ('code', LOAD), ('code', SAMPLE),
    ('markdown', SHOW_MD), ('code', SHOW),
    ('markdown', JUDGE_MD), ('code', JUDGE),
    ('markdown', FLOPS_MD), ('code', FLOPS),
    ('markdown', PAPER_MD), ('code', PAPER),
    ('markdown', CMD_MD), ('code', CMD),
    ('markdown', NEXT_MD),
)


def build_notebook() -> nbformat.NotebookNode:
  """The notebook, without outputs."""
  make = {'markdown': v4.new_markdown_cell, 'code': v4.new_code_cell}
  cells = []
  for i, (kind, source) in enumerate(CELLS):
    cell = make[kind](source)
    cell['id'] = f'cell-{i:02d}'  # Stable ids: regenerating gives an identical file.
    cells.append(cell)
  nb = v4.new_notebook(cells=cells)
  nb.metadata.update(
      kernelspec={'name': 'python3', 'display_name': 'Python 3', 'language': 'python'},
      language_info={'name': 'python'},
      colab={'provenance': [], 'toc_visible': True})
  return nb


def render(nb: nbformat.NotebookNode) -> str:
  return nbformat.writes(nb) + '\n'


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--output', default=PATH)
  parser.add_argument('--check', action='store_true', help='exit 1 if --output is out of date')
  args = parser.parse_args(argv)
  text = render(build_notebook())
  nbformat.validate(nbformat.reads(text, as_version=4))
  if args.check:
    with open(args.output) as f:
      current = f.read()
    if current != text:
      print(f'{args.output} is out of date: run python notebooks/make_colab.py', file=sys.stderr)
      return 1
    return 0
  with open(args.output, 'w') as f:
    f.write(text)
  print(f'wrote {args.output} ({len(CELLS)} cells)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
