"""A demo page: segment a photo in the browser with a MetaSeg model (Gradio).

    pip install "metaseg-hf[app]"
    python examples/app.py --model runs/demo                    # the model examples/train.py trains
    python examples/app.py --model metaseg-t-ade20k --port 7860 --device cuda

A person uploads a photo (or picks an example) and sees the photo blended with the class colours at
its own size, a legend of the classes present with their share of the image, and a class-id PNG to
download (pixel value = class id, coloured with the model's palette). Controls: inference mode
(whole / slide), horizontal-flip and multi-scale test-time augmentation, overlay opacity (re-blends
without running the model again). Everything runs through the library's `segment()` and the
pictures come from `metaseg_hf.visualization`, as `examples/segment.py` writes them.

Uploads are read by the library's `image_io` and checked before they are decoded: a photo over
`--max_pixels` (from its header; this one limit replaces Pillow's decompression-bomb limit in the app's
process) or a file that is not a readable image gets a message naming the file, and the app keeps serving.

What the server serves and keeps: the example photos themselves (never the rest of their folders), the
uploads and results Gradio caches, and per request a temporary folder holding its class-id PNG. Uploads,
results and request folders are deleted after an hour (FILE_LIFETIME); all of it when the app exits. A
session keeps only the paths of its last photo and class-id PNG (for the opacity slider, which reads them
back), so memory does not grow with the number of sessions. The same function is an API (what a Space
exposes), callable with `gradio_client`:

    from gradio_client import Client, handle_file
    overlay, legend_html, class_png, status = Client("http://127.0.0.1:7860/").predict(
        handle_file("photo.jpg"), "whole", False, False, 0.5, api_name="/segment")
"""

import argparse
import atexit
import html
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before Gradio is imported: no telemetry, no version check

import gradio as gr
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

import metaseg_hf  # noqa: F401  (registers MetaSeg with the Auto classes)
from metaseg_hf.image_io import ImageFileError, ImageTooLargeError, open_image_file, read_label
from metaseg_hf.inference_metaseg import WINDOW_BATCH_SIZE, count_forward_passes, segment
from metaseg_hf.presets import ARCHITECTURES, TTA_SCALES
from metaseg_hf.synthetic import save_example_image
from metaseg_hf.visualization import (
    class_fractions,
    class_map_image,
    class_palette,
    known_dataset,
    overlay_image,
)

HOW_TO_GET_A_MODEL = """\
examples/app.py needs a model: --model FOLDER_OR_HUB_ID. It trains nothing itself. To get one:
  - train the demo model on the built-in synthetic scenes (a few minutes on a CPU):
        accelerate launch examples/train.py --output_dir runs/demo
        python examples/app.py --model runs/demo
  - or convert an official MetaSeg checkpoint:
        python conversion/convert_metaseg_to_hf.py --checkpoint metaseg_tiny_ade.pth --output_dir metaseg-t-ade20k
        python examples/app.py --model metaseg-t-ade20k
"""

# MMSegmentation's multi-scale test uses TTA_SCALES (0.5 ... 1.75); three ratios keep a CPU demo responsive.
DEFAULT_SCALES = (0.75, 1.0, 1.25)
DEFAULT_MAX_PIXELS = 40_000_000
# Seconds an upload, a result picture or a class-id PNG stays on the server (and a session's last result).
FILE_LIFETIME = 3600
# How the page's title names the datasets of `visualization.KNOWN_DATASETS`.
DATASET_TITLES = {"ade20k": "ADE20K", "cityscapes": "Cityscapes", "coco-stuff164k": "COCO-Stuff 164k",
                  "synthetic": "synthetic scenes"}


class PhotoError(ValueError):
    """An upload the app refuses: not an image, truncated or corrupt, or too large."""


def model_title(config) -> str:
    """The page's title from what the config knows: the variant (MetaSeg-T / -B by its encoder sizes), the
    dataset (by its class names) and the number of classes, e.g. "MetaSeg-T · ADE20K · 150 classes"."""
    variant = next((f"MetaSeg-{name.upper()}" for name, sizes in ARCHITECTURES.items()
                    if list(sizes["hidden_sizes"]) == list(config.hidden_sizes)
                    and list(sizes["depths"]) == list(config.depths)), "MetaSeg")
    dataset = known_dataset(config)
    parts = [variant] + ([DATASET_TITLES[dataset]] if dataset else []) + [f"{config.num_labels} classes"]
    return " · ".join(parts)


def photo_input(**kwargs) -> gr.Image:
    """The photo upload: a gr.Image (the page shows the uploaded photo) that hands the app the uploaded file's
    path without opening it (gr.Image's own preprocessing opens it with Pillow first), so that
    `SegmentationDemo.read_photo` checks the size from the header before anything decodes the file, and words
    every refusal itself. (Set on the instance: a gr.Image subclass would make Gradio write a .pyi file here.)"""
    photo = gr.Image(type="filepath", image_mode=None, sources=["upload"], **kwargs)

    def uploaded_path(payload):
        if payload is None:
            return None
        if payload.path is None:  # a data: URL instead of an uploaded file
            raise gr.Error("Upload the photo as a file.", print_exception=False)
        return str(payload.path)

    photo.preprocess = uploaded_path
    return photo


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or Hub id (see the message printed without it)")
    # Gradio's variables (a Hugging Face Space sets them) are the defaults.
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 serves the network)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--examples", nargs="+", type=Path,
                        help="example photos (default: two held-out scenes of the synthetic demo dataset)")
    parser.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES),
                        help=f"ratios of the multi-scale option (official: {' '.join(map(str, TTA_SCALES))})")
    parser.add_argument("--window_size", type=int,
                        help="slide mode: window side (default: the model's, else the processor's short side)")
    parser.add_argument("--window_stride", type=int,
                        help="slide mode: window stride (default: the model's, else 2/3 of the window)")
    parser.add_argument("--batch_size", type=int, default=WINDOW_BATCH_SIZE, help="sliding windows per forward pass")
    parser.add_argument("--max_pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest photo accepted")
    parser.add_argument("--max_file_size", default="50mb", help="largest upload accepted (Gradio refuses bigger)")
    parser.add_argument("--concurrency", type=int, default=1, help="requests segmented at the same time")
    parser.add_argument("--trust_remote_code", action="store_true")
    args = parser.parse_args(argv)
    for name in ("batch_size", "max_pixels", "concurrency", "window_size", "window_stride"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if any(ratio <= 0 for ratio in args.scales):
        parser.error(f"--scales must be positive resize ratios, got {args.scales}")
    return args


class _CountingModel:
    """The shared model, seen by one request: calls `on_forward(count)` after each forward pass."""

    def __init__(self, model, on_forward):
        self._model, self._on_forward, self._calls = model, on_forward, 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        outputs = self._model(*args, **kwargs)
        self._calls += 1
        self._on_forward(self._calls)
        return outputs


# The id column, right-aligned and kept apart from the class name ("4  stripes", not "4stripes").
ID_CELL = 'style="text-align:right;padding:0 0.8em 0 0.4em"'


def legend_html(rows: list[tuple[int, str, float]], palette) -> str:
    """The legend as an HTML table: swatch, class id, name and share of the image, largest first."""
    lines = []
    for index, name, fraction in rows:
        red, green, blue = (int(value) for value in palette[index])
        swatch = (f'<span style="display:inline-block;width:1.1em;height:1.1em;border:1px solid #000;'
                  f'background:rgb({red},{green},{blue})"></span>')
        lines.append(f'<tr data-class-id="{index}"><td>{swatch}</td><td class="id" {ID_CELL}>{index}</td>'
                     f'<td class="name">{html.escape(name.strip())}</td><td class="share">{fraction:.2%}</td></tr>')
    header = f"<tr><th></th><th {ID_CELL}>id</th><th>class</th><th>share</th></tr>"
    return (f'<div style="max-height:28em;overflow-y:auto"><p>{len(rows)} classes present</p>'
            f'<table class="legend"><thead>{header}</thead><tbody>{"".join(lines)}</tbody></table></div>')


class SegmentationDemo:
    """The page's work, for one model. Holds only settings: every result lives in its request (and, for
    the opacity slider, in the person's own session state)."""

    def __init__(self, model, processor, work_dir, scales=DEFAULT_SCALES, window_size=None, window_stride=None,
                 window_batch_size=WINDOW_BATCH_SIZE, max_pixels=DEFAULT_MAX_PIXELS):
        self.model, self.processor, self.work_dir = model.eval(), processor, Path(work_dir)
        # `read_photo` refuses photos over max_pixels from the header, where Pillow checks its own
        # decompression-bomb limit: one limit and one message in this process (Pillow's would refuse photos
        # above 2 x 89.5 megapixels in its own words whatever --max_pixels says, and warn above 89.5).
        Image.MAX_IMAGE_PIXELS = None
        self.palette = class_palette(model.config)
        self.scales, self.window_batch_size, self.max_pixels = tuple(scales), window_batch_size, max_pixels
        config = model.config
        short_side = getattr(processor.size, "shortest_edge", None) or min(
            value for value in (getattr(processor.size, "height", None), getattr(processor.size, "width", None)) if value)
        self.window_size = window_size or config.sliding_window_size or short_side
        self.window_stride = window_stride or config.sliding_window_stride or max(1, self.window_size * 2 // 3)

    # ------------------------------------------------------------------ reading the upload

    def read_photo(self, path) -> torch.Tensor:
        """The uploaded file as (H, W, 3) uint8 RGB, read by `image_io` (as the processor reads files). Its size
        is checked from the header before decoding; every refusal is a PhotoError naming the file."""
        name = Path(path).name
        try:
            image = open_image_file(path, name, max_pixels=self.max_pixels)
        except ImageTooLargeError as error:
            width, height = error.size
            raise PhotoError(
                f"{name} is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels): refused before "
                f"decoding: this demo accepts photos of at most {self.max_pixels:,} pixels "
                f"({self.max_pixels / 1e6:g} megapixels, --max_pixels); downscale it and upload it again."
            ) from None
        except ImageFileError as error:
            reason = error.reason.replace(str(path), name)  # Pillow's words may hold the server's path
            raise PhotoError(
                f"{name} is not an image file this demo can read ({reason}); upload a complete photo "
                "(JPEG, PNG, WebP, BMP, TIFF, ...)."
            ) from None
        with image:
            return self.processor.to_rgb(image)

    # ------------------------------------------------------------------ progress

    def forward_passes(self, height: int, width: int, mode: str, flip: bool, scales) -> int:
        """How many model calls `segment()` makes on a `height` x `width` photo (the progress bar's total)."""
        return count_forward_passes(
            self.processor, height, width, mode, self.window_size, self.window_stride, flip, scales,
            self.window_batch_size,
        )

    # ------------------------------------------------------------------ the page's functions

    def run(self, photo, mode, flip, multi_scale, opacity, progress=gr.Progress()):  # noqa: B008 (Gradio's API)
        """Upload -> (overlay, legend HTML, class-id PNG path, status, session state)."""
        if photo is None:
            return None, "", None, "Upload a photo or pick an example.", None
        if mode not in ("whole", "slide"):
            raise gr.Error(f"mode must be 'whole' or 'slide', got {mode!r}.")
        started = time.perf_counter()
        name = Path(photo).name
        progress(0.0, desc=f"reading {name}")
        try:
            rgb = self.read_photo(photo)
        except PhotoError as error:  # the person's file, not the app: the message says it all, no traceback
            raise gr.Error(str(error), duration=None, print_exception=False) from error
        height, width = rgb.shape[:2]
        scales = self.scales if multi_scale else (1.0,)
        total = self.forward_passes(height, width, mode, flip, scales)

        def on_forward(count):
            progress((count, total), desc=f"{mode} inference on {name}", unit="forward passes")
            if count == total:
                progress(1.0, desc=f"resizing to {width}x{height} and taking the argmax")

        on_forward(0)
        window = {"window_size": self.window_size, "window_stride": self.window_stride} if mode == "slide" else {}
        try:
            prediction = segment(_CountingModel(self.model, on_forward), self.processor, rgb, mode=mode, flip=flip,
                                 scales=scales, window_batch_size=self.window_batch_size, probabilities_max="input",
                                 **window)[0]
        except ValueError as error:
            raise gr.Error(f"{name}: {error}", duration=None) from error
        segmentation = prediction.segmentation

        rows = class_fractions(segmentation, self.model.config.id2label)
        self.remove_old_requests()
        request_dir = Path(tempfile.mkdtemp(prefix="request-", dir=self.work_dir))
        class_png = request_dir / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', Path(photo).stem) or 'photo'}_classes.png"
        class_map_image(segmentation, self.palette).save(class_png)
        overlay = overlay_image(rgb, segmentation, self.palette, opacity)
        options = [mode] + (["flip"] if flip else []) + ([f"scales {', '.join(map(str, scales))}"] if multi_scale else [])
        status = (f"{name}: {width}x{height} pixels, {' + '.join(options)}, {len(rows)} classes, mean confidence "
                  f"{prediction.probabilities_max.mean().item():.1%} (at network input resolution), {time.perf_counter() - started:.2f} s "
                  f"on {next(self.model.parameters()).device}.")
        # The session keeps the paths only (the files expire with FILE_LIFETIME): no arrays held per session.
        state = {"photo": str(photo), "class_png": str(class_png)}
        return overlay, legend_html(rows, self.palette), str(class_png), status, state

    def remove_old_requests(self):
        """Deletes the request folders older than FILE_LIFETIME (Gradio's copies go at the same age)."""
        for folder in self.work_dir.glob("request-*"):
            try:
                expired = time.time() - folder.stat().st_mtime > FILE_LIFETIME
            except FileNotFoundError:  # a concurrent request deleted it first
                continue
            if expired:
                shutil.rmtree(folder, ignore_errors=True)  # ditto

    def blend(self, state, opacity):
        """The overlay at another opacity, from the session's last photo and class-id PNG, read back from
        their files (no model call)."""
        if state is None:
            return gr.skip()
        try:
            rgb = self.read_photo(state["photo"])
            segmentation = read_label(state["class_png"], "class_png")
        except ValueError as error:  # PhotoError included: the files expired (FILE_LIFETIME) or were removed
            raise gr.Error("The last result is no longer on the server; segment the photo again.",
                           print_exception=False) from error
        return overlay_image(rgb, segmentation, self.palette, opacity)

    # ------------------------------------------------------------------ the page

    def build(self, examples=(), title="MetaSeg demo") -> gr.Blocks:
        config = self.model.config
        with gr.Blocks(title=title, analytics_enabled=False, delete_cache=(FILE_LIFETIME, FILE_LIFETIME)) as page:
            gr.Markdown(
                f"# {title}\nUpload a photo or pick an example: the page shows the classes this model "
                f"({config.num_labels} classes, official test mode `{config.inference_mode}`) sees in it. "
                f"Slide mode uses {self.window_size}-pixel windows every {self.window_stride} pixels; photos up to "
                f"{self.max_pixels / 1e6:g} megapixels."
            )
            with gr.Row():
                with gr.Column(scale=1):
                    photo = photo_input(label="Photo", elem_id="photo")
                    mode = gr.Radio(["whole", "slide"], value=config.inference_mode, label="Inference mode",
                                    elem_id="mode")
                    flip = gr.Checkbox(label="Flip (average with the mirrored photo)", elem_id="flip")
                    multi_scale = gr.Checkbox(label=f"Multi-scale ({', '.join(map(str, self.scales))})",
                                              elem_id="multi-scale")
                    opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity", elem_id="opacity")
                    if examples:
                        gr.Examples([[str(path)] for path in examples], inputs=[photo], label="Example photos",
                                    cache_examples=False)
                with gr.Column(scale=2):
                    overlay = gr.Image(label="Overlay", type="pil", format="png", interactive=False, elem_id="overlay")
                    status = gr.Textbox(label="Status", interactive=False, elem_id="status")
            with gr.Row():
                legend = gr.HTML(label="Legend", elem_id="legend")
                class_png = gr.File(label="Class-id PNG (pixel value = class id)", interactive=False,
                                    elem_id="class-png")
            state = gr.State(time_to_live=FILE_LIFETIME)
            gr.on([photo.change, mode.change, flip.change, multi_scale.change], self.run,
                  inputs=[photo, mode, flip, multi_scale, opacity], outputs=[overlay, legend, class_png, status, state],
                  api_name="segment")
            opacity.release(self.blend, inputs=[state, opacity], outputs=[overlay], api_visibility="private")
        return page


def example_photos(paths, work_dir: Path) -> list[Path]:
    """The given example photos, or two held-out synthetic scenes written into `work_dir`."""
    if paths:
        missing = [str(path) for path in paths if not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(f"--examples: no such file: {', '.join(missing)}")
        return [Path(path).resolve() for path in paths]
    return [save_example_image(work_dir / f"synthetic-scene-{index}.png", index, save_label=False)[0]
            for index in range(2)]


def create_app(args) -> tuple[gr.Blocks, dict, "SegmentationDemo"]:
    """The page for parsed `args`, the keyword arguments of its `launch()` and its `SegmentationDemo`. Per-request
    files go to a temporary folder removed when the process exits. The server serves the example files
    themselves and nothing else of their folders (`allowed_paths`); Gradio's own cache holds uploads and results."""
    model = AutoModelForSemanticSegmentation.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    work_dir = Path(tempfile.mkdtemp(prefix="metaseg-app-"))
    atexit.register(shutil.rmtree, work_dir, ignore_errors=True)
    examples = example_photos(args.examples, work_dir)
    demo = SegmentationDemo(model.to(args.device), processor, work_dir, args.scales, args.window_size,
                            args.window_stride, args.batch_size, args.max_pixels)
    page = demo.build(examples, title=model_title(model.config))
    page.queue(default_concurrency_limit=args.concurrency)
    launch_kwargs = dict(
        server_name=args.host, server_port=args.port, share=False, ssr_mode=False, show_error=True,
        max_file_size=args.max_file_size, allowed_paths=[str(path) for path in examples],
    )
    return page, launch_kwargs, demo


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.model:
        print(HOW_TO_GET_A_MODEL, file=sys.stderr)
        return 2
    page, launch_kwargs, _ = create_app(args)
    # `kill` as well as Ctrl+C ends through sys.exit, so the temporary folder is removed (atexit).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    page.launch(**launch_kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
