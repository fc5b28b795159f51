"""examples/app.py, the Gradio demo: in a real browser (headless Chromium through selenium) and through
`gradio_client` (the API a Space exposes).

One server per model for the whole module, bound to 127.0.0.1: the tiny official checkpoint converted
by the library (runs on a fresh clone; its example photo lies in a folder beside other files, which must
not be served) and the converted reference MetaSeg-T (the reference photo).
What the page shows is checked against the library's `segment()` on the same model folder.
Screenshots and the upload-to-overlay time go to `$METASEG_TEST_ARTIFACTS` (default tests/artifacts/).
"""

import asyncio
import importlib.util
import io
import json
import os
import shutil
import socket
import struct
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO_ROOT, TINY_DIR

pytest.importorskip("gradio", reason="the app's extra is not installed: pip install 'metaseg-hf[app]'")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from metaseg_hf import MetaSegConfig, MetaSegForSemanticSegmentation, MetaSegImageProcessor  # noqa: E402
from metaseg_hf.synthetic import SYNTHETIC_ID2LABEL, SYNTHETIC_PALETTE, save_example_image  # noqa: E402
from metaseg_hf.visualization import class_fractions, class_palette, overlay_image  # noqa: E402

TINY_PHOTO = TINY_DIR / "tiny-photo.png"
REFERENCE_PHOTO_NAME = "metaseg-t-ade20k-image.png"
# The app's documented slide default for a model without a window: the processor's short side (512)
# and 2/3 of it as the stride (MMSegmentation's ADE20K 512/341).
SLIDE = {"window_size": 512, "window_stride": 341}
TIMEOUT = 180  # seconds for one segmentation in the page (a loaded 2-core machine)


def load_app():
    spec = importlib.util.spec_from_file_location("metaseg_demo_app", REPO_ROOT / "examples" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


app = load_app()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("METASEG_TEST_ARTIFACTS", REPO_ROOT / "tests" / "artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Oracle:
    """The library's answer for a model folder: `segment()` and the visualisation functions."""

    def __init__(self, model_dir):
        self.model = MetaSegForSemanticSegmentation.from_pretrained(model_dir).eval()
        self.processor = MetaSegImageProcessor.from_pretrained(model_dir)
        self.palette = class_palette(self.model.config)

    def segmentation(self, photo, **kwargs) -> torch.Tensor:
        return self.processor.segment(self.model, photo, **kwargs)[0].segmentation

    def legend(self, segmentation) -> list:
        return [(index, name.strip(), f"{fraction:.2%}")
                for index, name, fraction in class_fractions(segmentation, self.model.config.id2label)]


class Server:
    def __init__(self, argv):
        page, launch_kwargs, demo = app.create_app(app.parse_args([*argv, "--host", "127.0.0.1"]))
        assert launch_kwargs["server_name"] == "127.0.0.1" and launch_kwargs["share"] is False
        page.launch(**launch_kwargs, prevent_thread_lock=True, quiet=True)
        self.page, self.url, self.demo = page, page.local_url.rstrip("/"), demo
        self.work_dir = demo.work_dir

    def close(self):
        self.page.close()

    def fetch(self, path) -> int:
        """The HTTP status of a request for the file `path` through Gradio's file route."""
        try:
            with urllib.request.urlopen(f"{self.url}/gradio_api/file={path}", timeout=60) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code


@pytest.fixture(scope="module", autouse=True)
def gradio_files(tmp_path_factory):
    """Gradio's uploads and results in this module's own temporary folder; Pillow's decompression-bomb limit
    (which the app replaces by its own) restored afterwards."""
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(tmp_path_factory.mktemp("gradio")))
        yield
    Image.MAX_IMAGE_PIXELS = limit


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """A person's folder: the example photo, and beside it files that are not for the page."""
    folder = tmp_path_factory.mktemp("photos")
    save_example_image(folder / "scene.png", index=0, save_label=False)
    (folder / "notes.txt").write_text("private notes")
    (folder / "private").mkdir()
    (folder / "private" / "key.txt").write_text("a private key")
    return folder


@pytest.fixture(scope="module")
def tiny_server(tiny_dir, photo_folder):
    server = Server(["--model", str(tiny_dir), "--port", str(free_port()), "--concurrency", "2",
                     "--examples", str(photo_folder / "scene.png")])
    yield server
    server.close()


@pytest.fixture(scope="module")
def tiny_oracle(tiny_dir):
    return Oracle(tiny_dir)


@pytest.fixture(scope="module")
def reference_server(converted_dir, reference):
    server = Server(["--model", str(converted_dir), "--port", str(free_port()),
                     "--examples", str(reference / REFERENCE_PHOTO_NAME)])
    yield server
    server.close()


@pytest.fixture(scope="module")
def client(tiny_server, tmp_path_factory):
    client = Client(tiny_server.url, verbose=False, download_files=str(tmp_path_factory.mktemp("client")))
    yield client
    client.close()


# --------------------------------------------------------------------------- the browser


@pytest.fixture(scope="module")
def browser():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("the browser test needs Debian's chromium and chromium-driver (apt-get install chromium "
                    "chromium-driver; .ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1400", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--disable-extensions",
                     # Nothing but loopback resolves: a page that needs the network shows it here.
                     "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def requested_urls(driver) -> list[str]:
    """Every URL the page asked for since the last call (Chrome's network log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def open_page(driver, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(server.url)
    WebDriverWait(driver, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"))


def page_result(driver, name: str, previous: dict | None = None, timeout: float = TIMEOUT) -> dict:
    """Waits until the page shows the result for the photo `name` (a new overlay if there was a `previous`
    result), and reads it."""
    from selenium.webdriver.support.ui import WebDriverWait

    script = """
        const status = document.querySelector('#status textarea');
        const img = document.querySelector('#overlay img');
        const link = document.querySelector('#class-png a[download]');
        if (!status || !status.value.startsWith(arguments[0] + ':') || !img || !img.complete || !img.naturalWidth
            || img.src === arguments[1] || !link) return null;
        return {status: status.value, overlay: [img.naturalWidth, img.naturalHeight], overlay_src: img.src,
                class_png: link.href,
                class_png_name: link.getAttribute('download'),
                legend: [...document.querySelectorAll('#legend tr[data-class-id]')].map(row => [
                    Number(row.dataset.classId), row.querySelector('.name').textContent,
                    row.querySelector('.share').textContent])};
    """
    previous_src = previous["overlay_src"] if previous else None
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: d.execute_script(script, name, previous_src))


def upload(driver, path):
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#photo input[type=file]").send_keys(str(path))


def check_page_result(result, server, oracle, photo):
    """The page's overlay size, legend and class-id PNG against `segment()` on the same model."""
    segmentation = oracle.segmentation(photo)
    height, width = segmentation.shape
    assert result["overlay"] == [width, height]
    assert [tuple(row) for row in result["legend"]] == oracle.legend(segmentation)
    assert result["class_png_name"] == f"{Path(photo).stem}_classes.png"
    assert result["class_png"].startswith(server.url)
    with urllib.request.urlopen(result["class_png"], timeout=60) as response:
        class_ids = np.array(Image.open(response))
    np.testing.assert_array_equal(class_ids, segmentation.numpy())
    assert f"{width}x{height} pixels" in result["status"]


def assert_only_loopback(urls, server):
    outside = [url for url in urls if not url.startswith((server.url, "data:", "blob:"))]
    assert not outside, f"the page asked for resources outside {server.url}: {outside}"


@pytest.mark.reference
def test_browser_segments_the_reference_photo(browser, reference_server, converted_dir, reference):
    """Upload -> overlay at the photo's size, legend and class-id PNG equal to segment(); screenshot; timing."""
    photo = reference / REFERENCE_PHOTO_NAME
    open_page(browser, reference_server)
    started = time.perf_counter()
    upload(browser, photo)
    result = page_result(browser, photo.name)
    seconds = time.perf_counter() - started
    browser.save_screenshot(str(artifacts_dir() / "app-reference-photo.png"))
    check_page_result(result, reference_server, Oracle(converted_dir), photo)
    assert_only_loopback(requested_urls(browser), reference_server)
    timing = {"photo": photo.name, "size": result["overlay"], "upload_to_overlay_s": round(seconds, 2),
              "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(), "status": result["status"]}
    (artifacts_dir() / "app-reference-photo-timing.json").write_text(json.dumps(timing, indent=2))
    print(f"\nupload to overlay on {photo.name}: {seconds:.2f} s ({torch.get_num_threads()} torch threads)")


LEGEND_GAP_SCRIPT = """
    // Pixels between the end of each legend row's class id and the start of its class name, as drawn.
    const textBox = cell => { const range = document.createRange(); range.selectNodeContents(cell);
                              return range.getBoundingClientRect(); };
    return [...document.querySelectorAll('#legend tr[data-class-id]')].map(
        row => textBox(row.querySelector('.name')).left - textBox(row.querySelector('.id')).right);
"""


def test_browser_segments_the_tiny_photo_and_an_example(browser, tiny_server, tiny_oracle, photo_folder):
    """The fresh-clone version: the tiny fixture photo uploaded (and shown), then the example photo picked."""
    from selenium.webdriver.common.by import By

    open_page(browser, tiny_server)
    assert browser.title == "MetaSeg · 7 classes"  # what the config knows, not the model folder's name
    upload(browser, TINY_PHOTO)
    result = page_result(browser, TINY_PHOTO.name)
    browser.save_screenshot(str(artifacts_dir() / "app-tiny-photo.png"))
    check_page_result(result, tiny_server, tiny_oracle, TINY_PHOTO)
    shown = browser.execute_script(
        "return [...document.querySelectorAll('#photo img')].map(img => [img.naturalWidth, img.naturalHeight])")
    assert shown == [[69, 67]], "the photo input shows the uploaded photo"
    gaps = browser.execute_script(LEGEND_GAP_SCRIPT)
    assert gaps and min(gaps) >= 8, f"the legend runs class ids into their names: gaps {gaps} px"

    # The example is offered (served from its own path, nothing else of its folder) and segments.
    example = photo_folder / "scene.png"
    buttons = [b for b in browser.find_elements(By.CSS_SELECTOR, "button.gallery-item")
               if b.find_elements(By.CSS_SELECTOR, f"img[src$='/{example.name}']")]
    assert buttons, "the example photo is not on the page"
    buttons[0].click()
    check_page_result(page_result(browser, example.name, previous=result), tiny_server, tiny_oracle, example)
    assert_only_loopback(requested_urls(browser), tiny_server)


def test_browser_shows_why_an_upload_is_refused(browser, tiny_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    fake = tmp_path / "holiday.png"
    fake.write_text("not a picture")
    open_page(browser, tiny_server)
    upload(browser, fake)
    message = "holiday.png is not an image file this demo can read"
    WebDriverWait(browser, TIMEOUT).until(lambda d: message in d.find_element(By.TAG_NAME, "body").text)
    browser.save_screenshot(str(artifacts_dir() / "app-refused-upload.png"))
    # The same page keeps working: a new photo after the refused one is segmented.
    browser.find_element(By.CSS_SELECTOR, "#photo button[aria-label='Remove Image']").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"))
    upload(browser, TINY_PHOTO)
    assert page_result(browser, TINY_PHOTO.name)["overlay"] == [69, 67]


# --------------------------------------------------------------------------- the API (gradio_client)


def api_segment(client, photo, mode="whole", flip=False, multi_scale=False, opacity=0.5):
    """The page's function through the API: (overlay path, legend HTML, class-id PNG path, status)."""
    job = client.submit(handle_file(str(photo)), mode, flip, multi_scale, opacity, api_name="/segment")
    return job.result(timeout=TIMEOUT)


def legend_rows(legend: str) -> list:
    """(id, name, share) of each row of the legend HTML, in order."""
    import re

    pattern = r'<tr data-class-id="(\d+)">.*?<td class="name">(.*?)</td><td class="share">(.*?)</td>'
    return [(int(index), name, share) for index, name, share in re.findall(pattern, legend)]


@pytest.mark.parametrize(
    "options",
    [dict(mode="whole", opacity=0.5), dict(mode="slide", flip=True, multi_scale=True, opacity=0.3)],
    ids=["whole", "slide-flip-multiscale"],
)
def test_api_gives_the_library_segmentation_and_pictures(client, tiny_oracle, tmp_path, options):
    job = client.submit(handle_file(str(TINY_PHOTO)), options["mode"], options.get("flip", False),
                        options.get("multi_scale", False), options["opacity"], api_name="/segment")
    overlay_path, legend, class_png, status = job.result(timeout=TIMEOUT)
    kwargs = {"flip": options.get("flip", False), "scales": app.DEFAULT_SCALES if options.get("multi_scale") else (1.0,)}
    if options["mode"] == "slide":
        kwargs.update(mode="slide", **SLIDE)
    segmentation = tiny_oracle.segmentation(TINY_PHOTO, **kwargs)
    np.testing.assert_array_equal(np.array(Image.open(class_png)), segmentation.numpy())
    assert Path(class_png).name == "tiny-photo_classes.png" and Image.open(class_png).mode == "P"
    rgb = tiny_oracle.processor.to_rgb(TINY_PHOTO)
    expected_overlay = overlay_image(rgb, segmentation, tiny_oracle.palette, options["opacity"])
    np.testing.assert_array_equal(np.array(Image.open(overlay_path).convert("RGB")), np.array(expected_overlay))
    assert legend_rows(legend) == tiny_oracle.legend(segmentation)
    assert status.startswith(f"tiny-photo.png: 69x67 pixels, {options['mode']}")
    if options["mode"] == "slide":  # the progress bar reaches the client (Gradio sends the latest every 10 ms)
        demo = app.SegmentationDemo(tiny_oracle.model, tiny_oracle.processor, tmp_path)
        total = demo.forward_passes(67, 69, "slide", True, app.DEFAULT_SCALES)
        updates = [getattr(update, "progress_data", None) or [] for update in job_updates(job)]
        bars = [(unit.length, unit.desc) for units in updates for unit in units]
        assert (total, "slide inference on tiny-photo.png") in bars


def job_updates(job) -> list:
    """Every status update the client received for a finished job."""
    async def collect():
        return [update async for update in job]

    return asyncio.run(collect())


def header_only_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says `width` x `height` and that holds no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def damaged_photos(folder: Path) -> dict:
    """Files that Pillow identifies but cannot decode, each with what its reason says: a BMP with a bad
    header, a JPEG cut inside its header, a WebP with a bad chunk, a PNG cut in its pixel data."""
    rgb = Image.open(TINY_PHOTO).convert("RGB")

    def encoded(format_name):
        buffer = io.BytesIO()
        rgb.save(buffer, format_name)
        return buffer.getvalue()

    bmp = bytearray(encoded("BMP"))
    bmp[14:18] = struct.pack("<I", 7)  # a DIB header size no BMP has
    webp = bytearray(encoded("WEBP"))
    webp[12:16] = b"VPX?"  # the image chunk's type
    files = {
        "header.bmp": bytes(bmp),
        "cut.jpg": encoded("JPEG")[:200],
        "chunk.webp": bytes(webp),
        "truncated.png": TINY_PHOTO.read_bytes()[: TINY_PHOTO.stat().st_size // 2],
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return {folder / name: name for name in files}


def test_bad_uploads_get_a_clear_message_and_the_app_keeps_serving(client, tiny_oracle, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("a shopping list, not a photo")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    wrong_extension = tmp_path / "photo.txt"
    wrong_extension.write_text("wrong extension")
    limit = r"refused before decoding: this demo accepts photos of at most 40,000,000 pixels \(40 megapixels"
    unreadable = r"{} is not an image file this demo can read \(.+\); upload a complete photo"
    cases = {
        text: unreadable.format(r"notes\.png"),
        empty: unreadable.format(r"empty\.jpg"),
        wrong_extension: unreadable.format(r"photo\.txt"),
        **{path: unreadable.format(name.replace(".", r"\.")) for path, name in damaged_photos(tmp_path).items()},
        # Past Pillow's own decompression-bomb limit (2 x 89.5 megapixels): the app's limit and words all the same.
        header_only_png(tmp_path / "huge.png", 20000, 20000): rf"huge\.png is 20000x20000 pixels \(400\.0 megapixels\): {limit}",
        # Under Pillow's limit, over the app's.
        header_only_png(tmp_path / "big.png", 12000, 10000): rf"big\.png is 12000x10000 pixels \(120\.0 megapixels\): {limit}",
    }
    for photo, message in cases.items():
        started = time.perf_counter()
        with pytest.raises(AppError, match=message):
            api_segment(client, photo)
        assert time.perf_counter() - started < 60, f"{photo.name} took long to be refused"
    _, _, class_png, _ = api_segment(client, TINY_PHOTO)
    np.testing.assert_array_equal(np.array(Image.open(class_png)), tiny_oracle.segmentation(TINY_PHOTO).numpy())


def test_max_pixels_is_the_one_limit_above_pillows_own(tiny_oracle, tmp_path, recwarn):
    """--max_pixels above Pillow's decompression-bomb limit: a photo between the two goes on to decoding without
    Pillow's warning, one above both is refused in the app's words with the app's number."""
    demo = app.SegmentationDemo(tiny_oracle.model, tiny_oracle.processor, tmp_path, max_pixels=300_000_000)
    # 108 megapixels: over Pillow's warning limit (89.5), under its error limit (179) and the app's (300).
    with pytest.raises(app.PhotoError, match=r"between\.png is not an image file this demo can read \(cannot load"):
        demo.read_photo(header_only_png(tmp_path / "between.png", 12000, 9000))  # no pixels: decoding fails
    with pytest.raises(app.PhotoError, match=r"huge\.png is 20000x20000 pixels \(400\.0 megapixels\): refused before "
                                             r"decoding: this demo accepts photos of at most 300,000,000 pixels"):
        demo.read_photo(header_only_png(tmp_path / "huge.png", 20000, 20000))
    assert not [warning for warning in recwarn if issubclass(warning.category, Image.DecompressionBombWarning)]


def test_server_serves_the_examples_and_nothing_beside_them(tiny_server, photo_folder):
    """The example's folder holds other files: they are refused, the example itself is served (and the
    browser test segments it)."""
    assert tiny_server.fetch(photo_folder / "scene.png") == 200
    assert tiny_server.fetch(photo_folder / "notes.txt") == 403
    assert tiny_server.fetch(photo_folder / "private" / "key.txt") == 403
    assert tiny_server.fetch(tiny_server.work_dir) == 403


def held_bytes(value) -> int:
    """Bytes of the arrays, tensors, images and byte strings inside nested dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, Image.Image):
        return len(value.tobytes())
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, dict):
        return sum(held_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(held_bytes(item) for item in value)
    return 0


def test_memory_held_per_session_does_not_grow(tiny_server, tmp_path):
    """Each request from a new client is a new session. What the server keeps for the sessions (their state
    and page values) holds no pixel data, so it does not grow with the number of sessions."""
    photo = save_example_image(tmp_path / "large.png", index=1, image_size=(480, 640), save_label=False)[0]
    holder = tiny_server.page.state_holder

    def held():
        return sum(held_bytes(session.state_data) + held_bytes(session.config_values)
                   for session in list(holder.session_data.values()))

    before, sessions = held(), len(holder.session_data)
    for index in range(4):
        client = Client(tiny_server.url, verbose=False, download_files=str(tmp_path / str(index)))
        try:
            api_segment(client, photo)
        finally:
            client.close()
        if index == 1:
            after_two = held()
    assert len(holder.session_data) >= sessions + 4
    assert held() == after_two == before, f"sessions hold {held() - before} bytes of pixel data"


def test_two_concurrent_clients_get_their_own_results(tiny_server, tiny_oracle, tmp_path):
    other = save_example_image(tmp_path / "scene.png", index=3, save_label=False)[0]
    photos = {"a": TINY_PHOTO, "b": other}
    expected = {key: tiny_oracle.segmentation(photo) for key, photo in photos.items()}
    before = set(tiny_server.work_dir.glob("request-*"))
    clients = {key: Client(tiny_server.url, verbose=False, download_files=str(tmp_path / key)) for key in photos}
    try:
        # Three requests per person, submitted at once, interleaved; the server runs two at a time.
        jobs = [(key, clients[key].submit(handle_file(str(photos[key])), "whole", False, False, 0.5,
                                          api_name="/segment")) for _ in range(3) for key in photos]
        results = [(key, job.result(timeout=TIMEOUT)) for key, job in jobs]
    finally:
        for client in clients.values():
            client.close()
    for key, (overlay_path, legend, class_png, status) in results:
        photo, segmentation = photos[key], expected[key]
        height, width = segmentation.shape
        assert status.startswith(f"{photo.name}: {width}x{height} pixels")
        assert Image.open(overlay_path).size == (width, height)
        assert Path(class_png).name == f"{photo.stem}_classes.png"
        np.testing.assert_array_equal(np.array(Image.open(class_png)), segmentation.numpy())
        assert legend_rows(legend) == tiny_oracle.legend(segmentation)
    new_folders = set(tiny_server.work_dir.glob("request-*")) - before
    assert len(new_folders) == len(jobs), "each request writes into its own temporary folder"


# --------------------------------------------------------------------------- the app's functions


class RecordedProgress:
    def __init__(self):
        self.updates = []

    def __call__(self, progress, desc=None, total=None, unit="steps"):
        self.updates.append((progress, desc))


def test_slide_mode_reports_each_forward_pass_and_the_opacity_reblends(tiny_oracle, tmp_path):
    demo = app.SegmentationDemo(tiny_oracle.model, tiny_oracle.processor, tmp_path)
    progress = RecordedProgress()
    photo = save_example_image(tmp_path / "wide.png", index=0, image_size=(60, 400), save_label=False)[0]
    overlay, _, class_png, _, state = demo.run(str(photo), "slide", True, True, 0.5, progress=progress)
    counts = [value for value, _ in progress.updates if isinstance(value, tuple)]
    total = counts[0][1]
    # A wide photo: several 512-pixel windows at each of the three scales, twice (flip).
    assert total == demo.forward_passes(60, 400, "slide", True, app.DEFAULT_SCALES) > 6
    assert counts == [(count, total) for count in range(total + 1)], "one update per forward pass, up to the total"
    assert progress.updates[-1] == (1.0, "resizing to 400x60 and taking the argmax")

    reblended = demo.blend(state, 0.8)
    segmentation = torch.from_numpy(np.array(Image.open(class_png))).long()
    expected = overlay_image(tiny_oracle.processor.to_rgb(photo), segmentation, tiny_oracle.palette, 0.8)
    np.testing.assert_array_equal(np.array(reblended), np.array(expected))
    assert overlay.size == reblended.size == (400, 60)


def test_expired_request_folders_are_removed(tiny_oracle, tmp_path):
    demo = app.SegmentationDemo(tiny_oracle.model, tiny_oracle.processor, tmp_path)
    old, recent, other = tmp_path / "request-old", tmp_path / "request-recent", tmp_path / "synthetic-scene-0.png"
    for folder in (old, recent):
        folder.mkdir()
        (folder / "photo_classes.png").write_bytes(b"png")
    other.write_bytes(b"png")
    expired = time.time() - app.FILE_LIFETIME - 60
    for path in (old, other):
        os.utime(path, (expired, expired))
    demo.remove_old_requests()
    assert not old.exists() and recent.exists() and other.exists()


def test_title_and_palette_come_from_the_config(tiny_oracle, tmp_path):
    assert app.model_title(tiny_oracle.model.config) == "MetaSeg · 7 classes"
    assert app.model_title(MetaSegConfig.from_preset("metaseg-t-ade20k")) == "MetaSeg-T · ADE20K · 150 classes"
    config = MetaSegConfig.from_preset("metaseg-t-ade20k", id2label=SYNTHETIC_ID2LABEL)  # the README's demo model
    assert app.model_title(config) == "MetaSeg-T · synthetic scenes · 5 classes"
    demo = app.SegmentationDemo(MetaSegForSemanticSegmentation(config), tiny_oracle.processor, tmp_path)
    np.testing.assert_array_equal(demo.palette, np.array(SYNTHETIC_PALETTE))  # background dark grey
    legend = app.legend_html([(4, "stripes", 0.25), (0, "background", 0.75)], demo.palette)
    assert legend_rows(legend) == [(4, "stripes", "25.00%"), (0, "background", "75.00%")]
    assert "background:rgb(40,40,40)" in legend


def test_without_a_model_it_trains_nothing_and_says_how_to_get_one(capsys):
    assert app.main([]) == 2
    message = capsys.readouterr().err
    assert "accelerate launch examples/train.py --output_dir runs/demo" in message
    assert "conversion/convert_metaseg_to_hf.py" in message

