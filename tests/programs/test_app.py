"""The web UI (`python -m diffusion_tf.app`), tested for real: the app runs in its own process on
a free port; requests go through `gradio_client` and plain HTTP, and (when Playwright and a
Chromium can be found or installed) a headless browser drives the page.

The model is the built-in shapes model when it is installed, else the tiny test model.
"""

import concurrent.futures
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
from PIL import Image
import pytest

gradio_client = pytest.importorskip("gradio_client", reason="the web UI tests need gradio (pip install '.[app]')")
pytest.importorskip("gradio", reason="the web UI tests need gradio (pip install '.[app]')")

from support import tiny_models  # noqa: E402

# One app process serves every test of this file: they all run on one worker.
pytestmark = pytest.mark.xdist_group("app")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    from diffusion_tf import presets

    return "shapes" if presets.builtin_available() else tiny_models.converted_folder("tiny-sd1")


def _start(port, out, model, extra=()):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "diffusion_tf.app", "--model", model, "--port", str(port), "--output-dir", str(out),
           "--max-upload-mb", "1", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(base URL, output folder, model, process) of a running app; its LoRA folder holds style.safetensors."""
    from support import shapes_lora

    root = tmp_path_factory.mktemp("app")
    out = root / "outputs"
    port, model = _free_port(), _model()
    shapes_lora.write_lora(str(root / "loras" / "style.safetensors"), "shapes" if model == "shapes" else model)
    proc = _start(port, out, model, ["--lora-dir", str(root / "loras")])
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/", timeout=5)
            break
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(1)
    else:
        proc.kill()
        pytest.fail("the app did not start in 300 s")
    yield url, out, model, proc
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(app):
    return gradio_client.Client(app[0] + "/", verbose=False)


def _size(app):
    return 64


def txt2img(client, prompt="a red circle on a blue background", seed=5, steps=3, batch=1, size=64, random=False,
            clip_skip=None, loras=None, lora_scale=None):
    # The clip skip (A1111's numbering) and LoRA controls come last: left out, they keep the page's defaults.
    extra = [v for v in (clip_skip, loras, lora_scale) if v is not None]
    assert len(extra) in (0, 3)
    return client.predict(prompt, "", steps, 4.0, "ddim", seed, random, batch, "model default", size, size, *extra,
                          api_name="/txt2img")


def _status(url, path):
    try:
        return urllib.request.urlopen(url + path, timeout=30).status
    except urllib.error.HTTPError as e:
        return e.code


def test_text_to_image_writes_pngs_with_parameters(app, client):
    from PIL import Image

    from diffusion_tf.png_info import read_parameters

    url, out, _, _ = app
    gallery, status = txt2img(client, seed=5, batch=2)
    assert len(gallery) == 2 and "2 image(s)" in status
    seeds = []
    for item in gallery:
        path = item["image"]
        with Image.open(path) as im:
            assert im.size == (64, 64)
        params = read_parameters(path)  # the downloaded file carries its parameters
        assert params["prompt"] == "a red circle on a blue background" and params["steps"] == 3
        seeds.append(params["seed"])
    assert seeds == [5, 6]
    assert len([n for n in os.listdir(out) if n.endswith(".png")]) >= 2


def test_same_seed_same_image(client):
    a, _ = txt2img(client, seed=9)
    b, _ = txt2img(client, seed=9)
    with open(a[0]["image"], "rb") as fa, open(b[0]["image"], "rb") as fb:
        from PIL import Image

        assert np.array_equal(np.asarray(Image.open(fa)), np.asarray(Image.open(fb)))


@pytest.mark.heavy  # 6-9 s, a variant of a default-run check: with CI's heavy run
def test_a_png_written_by_the_app_regenerates_with_from_png(app, client, tmp_path, monkeypatch):
    """The page and the command line share one request and one PNG writer: the largest seed is
    accepted, the model is named as the user named it, and --from-png gives the same image."""
    from PIL import Image

    import text2image
    from diffusion_tf.png_info import read_parameters

    _, _, model, _ = app
    gallery, _ = txt2img(client, seed=2**32 - 1, steps=2)
    path = gallery[0]["image"]
    params = read_parameters(path)
    assert params["seed"] == 2**32 - 1 and params["model"] == model
    monkeypatch.chdir(tmp_path)
    assert text2image.main(["--from-png", str(path), "--output", "again.png"]) == 0
    with Image.open(path) as a, Image.open(tmp_path / "again.png") as b:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    again = read_parameters(tmp_path / "again.png")
    assert {k: again[k] for k in params} == params


def test_reuse_parameters_from_a_png(client):
    gallery, _ = txt2img(client, seed=21)
    values = client.predict(gradio_client.handle_file(gallery[0]["image"]), api_name="/reuse")
    prompt, negative, steps, guidance, scheduler, seed, random_seed, width, height, clip_skip, loras = values
    assert (prompt, steps, guidance, scheduler, seed, random_seed, clip_skip, loras) == (
        "a red circle on a blue background", 3, 4.0, "ddim", 21, False, 1, [])


def test_reuse_parameters_of_an_a1111_png(client, tmp_path):
    """A1111's names (the older "DPM++ 2M Karras" form with its Schedule type, Clip skip) fill the
    controls through the request's own reader; a sampler we lack keeps the page's."""
    from diffusion_tf.png_info import save_png

    path = tmp_path / "a1111.png"
    save_png(str(path), np.zeros((64, 64, 3), np.uint8),
             "a cat <lora:style:0.5>\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M Karras, Schedule type: "
             "Karras, CFG scale: 7, Seed: 1234, Size: 64x64, Model hash: abc, Model: x, Clip skip: 2, Version: v1")
    values = client.predict(gradio_client.handle_file(str(path)), api_name="/reuse")
    assert list(values) == ["a cat <lora:style:0.5>", "blurry", 20, 7.0, "dpm++2m-karras", 1234, False, 64, 64, 2, []]
    save_png(str(path), np.zeros((64, 64, 3), np.uint8), "a dog\nSteps: 9, Sampler: UniPC, CFG scale: 3, Seed: 7")
    values = client.predict(gradio_client.handle_file(str(path)), api_name="/reuse")
    assert values[0] == "a dog" and values[2] == 9 and values[5] == 7 and values[4] in ("ddim", "pndm", "euler")


@pytest.mark.heavy  # 6-9 s, a variant of a default-run check: with CI's heavy run
def test_loras_and_clip_skip_are_applied_recorded_and_regenerate(app, client, tmp_path, monkeypatch):
    """A LoRA chosen on the page changes the image; its PNG carries the <lora:NAME:SCALE> tag, the
    Lora hashes and A1111's Clip skip, and --from-png with the same LoRA folder gives the same image."""
    from PIL import Image

    import text2image
    from diffusion_tf.lora import file_hash
    from diffusion_tf.png_info import read_parameters

    _, out, model, _ = app
    lora = out.parent / "loras" / "style.safetensors"
    plain, _ = txt2img(client, seed=17, steps=2, clip_skip=2, loras=[], lora_scale=1.0)
    styled, _ = txt2img(client, seed=17, steps=2, clip_skip=2, loras=["style"], lora_scale=0.75)
    params = read_parameters(styled[0]["image"])
    assert params["prompt"] == "a red circle on a blue background <lora:style:0.75>"
    assert params["lora_hashes"] == f"style: {file_hash(lora)}" and params["clip_skip"] == 2
    assert "lora_hashes" not in read_parameters(plain[0]["image"])
    images = [np.asarray(Image.open(g[0]["image"])) for g in (plain, styled)]
    assert not np.array_equal(*images)  # the LoRA is merged
    again, _ = txt2img(client, seed=17, steps=2, clip_skip=2, loras=[], lora_scale=1.0)
    np.testing.assert_array_equal(np.asarray(Image.open(again[0]["image"])), images[0])  # and taken out again
    skipped_none, _ = txt2img(client, seed=17, steps=2, clip_skip=1, loras=[], lora_scale=1.0)
    assert "clip_skip" not in read_parameters(skipped_none[0]["image"])
    assert not np.array_equal(np.asarray(Image.open(skipped_none[0]["image"])), images[0])  # clip skip reaches it

    monkeypatch.chdir(tmp_path)
    assert text2image.main(["--from-png", styled[0]["image"], "--lora-dir", str(lora.parent),
                            "--output", "again.png"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "again.png")), images[1])
    assert read_parameters(tmp_path / "again.png") == params


def test_a_lora_that_is_not_in_the_folder_is_a_message(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="no LoRA file named 'nowhere'"):
        txt2img(client, prompt="a red circle <lora:nowhere:1>")
    assert len(txt2img(client, seed=3)[0]) == 1  # still serving, and the next request has no LoRA


def test_bad_inputs_are_messages_and_the_app_keeps_serving(app, client, tmp_path):
    from gradio_client.exceptions import AppError

    from diffusion_tf.png_info import save_png

    not_image = tmp_path / "notes.png"
    not_image.write_text("this is not an image")
    bare = tmp_path / "bare.png"
    save_png(str(bare), np.zeros((8, 8, 3), np.uint8), None)
    with pytest.raises(AppError, match="carries no generation parameters"):
        client.predict(gradio_client.handle_file(str(bare)), api_name="/reuse")
    with pytest.raises(AppError, match="Write a prompt first"):
        txt2img(client, prompt="   ")
    with pytest.raises(AppError, match="not an image|cannot identify image file"):  # ours or Gradio's decoder
        client.predict("a cat", "", 2, 4.0, "ddim", 1, False, 1, "model default",
                       gradio_client.handle_file(str(not_image)), 0.5, api_name="/img2img")
    image = tmp_path / "in.png"
    save_png(str(image), np.full((64, 64, 3), 128, np.uint8), None)
    editor = {"background": gradio_client.handle_file(str(image)), "layers": [], "composite": None}
    with pytest.raises(AppError, match="mask is empty"):
        client.predict("a cat", "", 2, 4.0, "ddim", 1, False, 1, "model default", editor, 1.0, api_name="/inpaint")
    gallery, _ = txt2img(client, seed=3)  # still serving
    assert len(gallery) == 1


def test_image_to_image_and_outpainting(client, tmp_path):
    from PIL import Image

    from diffusion_tf.png_info import read_parameters, save_png

    image = tmp_path / "in.png"
    save_png(str(image), np.full((64, 64, 3), 200, np.uint8), None)
    gallery, _ = client.predict("a cat", "", 4, 4.0, "ddim", 1, False, 1, "model default",
                                gradio_client.handle_file(str(image)), 0.5, api_name="/img2img")
    assert read_parameters(gallery[0]["image"])["denoising_strength"] == 0.5
    gallery, _ = client.predict("a cat", "", 2, 4.0, "ddim", 1, False, 1, "model default",
                                gradio_client.handle_file(str(image)), 0, 64, 0, 0, api_name="/outpaint")
    with Image.open(gallery[0]["image"]) as im:
        assert im.size == (128, 64)


def test_upload_larger_than_the_limit_is_refused(app, client, tmp_path):
    from gradio_client.exceptions import AppError

    big = tmp_path / "big.png"
    rng = np.random.default_rng(0)
    Image = __import__("PIL.Image", fromlist=["Image"])
    Image.fromarray(rng.integers(0, 255, (800, 800, 3), np.uint8)).save(big)  # ~1.9 MB of noise
    assert os.path.getsize(big) > 1_000_000
    with pytest.raises((AppError, ValueError, Exception), match="(?i)size|large|limit|413"):
        client.predict("a cat", "", 2, 4.0, "ddim", 1, False, 1, "model default",
                       gradio_client.handle_file(str(big)), 0.5, api_name="/img2img")
    assert len(txt2img(client, seed=4)[0]) == 1


def test_concurrent_users_all_get_their_images(client, app):
    url = app[0]

    def one(seed):
        c = gradio_client.Client(url + "/", verbose=False)
        return txt2img(c, seed=seed)[0][0]["image"]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(one, [31, 32, 33, 34]))
    from diffusion_tf.png_info import read_parameters

    assert sorted(read_parameters(p)["seed"] for p in paths) == [31, 32, 33, 34]


def test_the_gallery_shows_previews_while_it_denoises(client):
    """A generation streams its previews (about ten: every steps // 10) before the saved images."""
    job = client.submit("a cat", "", 20, 4.0, "ddim", 2, False, 2, "model default", 64, 64, api_name="/txt2img")
    job.result(timeout=300)
    outputs = job.outputs()
    statuses = [status for _, status in outputs]
    assert statuses[:-1] == ["denoising..."] * 9 and statuses[-1].startswith("2 image(s) in ")
    previews, final = outputs[-2][0], outputs[-1][0]
    assert len(previews) == len(final) == 2
    with Image.open(previews[0]["image"]) as im:
        assert im.size == (64, 64)


def test_a_request_can_be_cancelled(client):
    job = client.submit("a cat", "", 150, 4.0, "ddim", 1, False, 1, "model default", 64, 64, api_name="/txt2img")
    time.sleep(3)
    job.cancel()
    time.sleep(1)
    gallery, _ = txt2img(client, seed=8)  # the queue moves on
    assert len(gallery) == 1


@pytest.mark.parametrize(
    "path",
    [
        "/gradio_api/file=../../../../etc/passwd",
        "/gradio_api/file=%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/gradio_api/file=%2E%2e%2F%2e%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "/gradio_api/file=%252e%252e/%252e%252e/etc/passwd",
        "/gradio_api/file=..%5c..%5c..%5cetc%5cpasswd",
        "/gradio_api/file=/etc/passwd",
        "/file=/etc/passwd",
        "/static/../../../../etc/passwd",
        "/assets/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/gradio_api/file=OUTPUT/../../../etc/passwd",
        "/gradio_api/file=MODEL/config.json",
    ],
)
def test_no_file_outside_the_output_folder_is_served(app, path):
    url, out, model, _ = app
    model_dir = model if os.path.isdir(model) else ROOT
    path = path.replace("OUTPUT", str(out)).replace("MODEL", model_dir)
    assert _status(url, path) in (403, 404)


def test_files_in_the_output_folder_are_served(app, client):
    url, out, _, _ = app
    gallery, _ = txt2img(client, seed=12)
    name = os.path.basename(gallery[0]["image"])
    assert _status(url, f"/gradio_api/file={out}/{name}") == 200


def test_port_in_use_is_a_clear_error(app, tmp_path):
    url, _, model, _ = app
    port = int(url.rsplit(":", 1)[1])
    proc = _start(port, tmp_path / "o", model)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


def test_is_traversal():
    from diffusion_tf.app import is_traversal

    for bad in ("../x", "a/%2e%2E/b", "%252E%252E%252F", "a\\b", "a%5cb", "x%00", "file=.."):
        assert is_traversal(bad), bad
    for good in ("/gradio_api/file=/out/a.png", "/a..b/c", "/x/...png"):
        assert not is_traversal(good), good


# ------------------------------------------------------------------ the page in a browser
def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_page_in_headless_chromium(app):
    """Types a prompt, clicks Generate, and waits for an image of the right size in the gallery."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no Chromium found (Debian: apt-get install chromium); .ci/run installs it")
    url = app[0]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(url + "/", wait_until="networkidle", timeout=120_000)
            page.locator("#txt2img-prompt textarea").fill("a red circle on a blue background")
            page.locator("#txt2img-random input").uncheck()
            page.locator("#txt2img-generate").click()
            # Previews ("denoising...") take the gallery's place while the model runs; the
            # result is there once the status line reports it.
            status = page.locator("#txt2img-status textarea")
            status.element_handle(timeout=60_000)
            page.wait_for_function(
                "el => el.value.includes('image(s)')", arg=status.element_handle(), timeout=240_000)
            assert "1 image(s)" in status.input_value()
            image = page.locator("#txt2img-gallery img").first
            image.wait_for(state="visible", timeout=60_000)
            page.wait_for_function(
                "el => el.complete && el.naturalWidth > 0", arg=image.element_handle(), timeout=60_000)
            size = image.evaluate("el => [el.naturalWidth, el.naturalHeight]")
            assert size == [64, 64]
        finally:
            browser.close()
