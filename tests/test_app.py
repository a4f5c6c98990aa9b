"""The comparison app (munba-app; app.py in every output folder): generate's images, the command's one-line checks,
the folder's copy run as a Space runs it, and the page driven in a real browser (headless Chromium)."""

from __future__ import annotations

import importlib.util
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

import munba_diffusion.app as app_module
import munba_diffusion.commands.app as command_module
from munba_diffusion.app import APP_FILE_NAME, MODEL_ENV, generate
from munba_diffusion.commands.app import AppConfig
from munba_diffusion.config import build_parser, parse_config
from munba_diffusion.diffusion.base_model import load_base_pipeline
from munba_diffusion.diffusion.export import export_erased_model
from munba_diffusion.diffusion.loading import load_erased_pipeline
from munba_diffusion.models import DEMO_MODEL
from munba_diffusion.pipelines.munba import LORA_WEIGHT_NAME
from tests.test_architecture import _imports
from tests.tiny_sd import add_random_lora, save_tiny_sd, tiny_erasure_config

torch.set_num_threads(1)

CONCEPT = "red"
PROMPT = "a red circle"  # a prompt of the erased concept
STEPS = 4
CLEARLY_DIFFERENT = 20.0  # mean absolute difference in 0-255 units; the random LoRA moves pixels by ~70
INSTALL_BROWSER = "apt-get install chromium chromium-driver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
)


@pytest.fixture(scope="module")
def erased(tmp_path_factory) -> Path:
    """An erased output folder of the bundled demo model (a random LoRA stands in for a trained erasure of red)."""
    pipe = load_base_pipeline(DEMO_MODEL)
    add_random_lora(pipe)
    record = tiny_erasure_config(CONCEPT, base_model=DEMO_MODEL)
    return export_erased_model(pipe, tmp_path_factory.mktemp("app") / "demo-no-red", record)


@pytest.fixture(scope="module")
def pipeline(erased):
    return load_erased_pipeline(erased)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def mean_difference(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(pixels(a) - pixels(b)).mean())


def test_scale_zero_gives_the_original_and_scale_one_the_erased_image(erased, pipeline):
    original, changed = generate(pipeline, PROMPT, seed=0, steps=STEPS, erasure_scale=1.0)
    assert original.size == changed.size == (32, 32)
    assert mean_difference(original, changed) > CLEARLY_DIFFERENT
    # the right image is the erased folder's own (plain diffusers, no LoRA switching), the left one the base model's
    generator = torch.Generator("cpu").manual_seed(0)
    plain = DiffusionPipeline.from_pretrained(erased)(PROMPT, num_inference_steps=STEPS, generator=generator)
    np.testing.assert_array_equal(pixels(changed), pixels(plain.images[0]))
    base = load_base_pipeline(DEMO_MODEL)
    base_image = base(PROMPT, num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.abs(pixels(original) - pixels(base_image)).max() <= 1  # fused W0 + dW - dW: float rounding only

    left, right = generate(pipeline, PROMPT, seed=0, steps=STEPS, erasure_scale=0.0)
    np.testing.assert_array_equal(pixels(left), pixels(original))
    np.testing.assert_array_equal(pixels(right), pixels(original))  # scale 0: exactly the original's image
    half = generate(pipeline, PROMPT, seed=0, steps=STEPS, erasure_scale=0.5)[1]
    assert 0 < mean_difference(half, original) and 0 < mean_difference(half, changed)
    assert pipeline.erasure_scale == 1.0  # the pipeline's own scale is left as it was
    other_seed = generate(pipeline, PROMPT, seed=1, steps=STEPS, erasure_scale=1.0)[0]
    assert mean_difference(other_seed, original) > 0


@pytest.mark.parametrize(
    ("prompt", "seed", "steps", "message"),
    [
        ("  ", 0, 4, "type a prompt"),
        (PROMPT, -1, 4, "seed must be"),
        (PROMPT, 0.5, 4, "seed must be"),
        (PROMPT, 0, 0, "steps must be"),
    ],
)
def test_generate_refuses_bad_input_with_one_line(pipeline, prompt, seed, steps, message):
    with pytest.raises(ValueError, match=message) as error:
        generate(pipeline, prompt, seed=seed, steps=steps)
    assert "\n" not in str(error.value)


def test_every_output_folder_carries_the_app_and_it_runs_there_without_munba_diffusion(erased, pipeline, monkeypatch):
    copy = erased / APP_FILE_NAME
    assert copy.read_bytes() == Path(app_module.__file__).read_bytes()
    assert not {name for name in _imports(Path(app_module.__file__)) if name.startswith("munba_diffusion")}
    # the folder's copy, imported by path as `python app.py` or a Space does, loads the folder it lies in
    monkeypatch.delenv(MODEL_ENV, raising=False)
    spec = importlib.util.spec_from_file_location("space_app", copy)
    space_app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(space_app)
    own = space_app.load_model()
    assert type(own).__name__ == "MunbaPipeline" and own.erased_concepts == [CONCEPT]
    assert type(own).__module__ != type(pipeline).__module__  # the folder's munba.py, not the installed class
    for scale in (1.0, 0.0):
        expected = generate(pipeline, PROMPT, seed=3, steps=STEPS, erasure_scale=scale)
        for mine, theirs in zip(space_app.generate(own, PROMPT, 3, STEPS, scale), expected):
            np.testing.assert_array_equal(pixels(mine), pixels(theirs))
    monkeypatch.setenv(MODEL_ENV, str(erased.parent))  # a folder that is no erased model: one line naming the fix
    with pytest.raises(FileNotFoundError, match=f"no model_index.json.*set {MODEL_ENV}") as error:
        space_app.load_model()
    assert "\n" not in str(error.value)


def test_the_model_card_says_how_to_run_the_app(erased):
    card = (erased / "README.md").read_text()
    for how in ("munba-app path/to/this/folder", f"python {APP_FILE_NAME}", f"`{MODEL_ENV}` to `demo-no-red`"):
        assert how in card
    assert "munba-diffusion[app]" in card and "requirements.txt" in card


def _fail_if_loaded(*args, **kwargs):
    raise AssertionError("a model was loaded before the bad input was reported")


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("missing", "is not a folder; pass the erased model folder"),
        ("not_a_pipeline", "no model_index.json"),
        ("no_erasure", "pipeline without an erasure"),
        ("no_lora", f"has no {LORA_WEIGHT_NAME}, which the app needs for the original model"),
        ("bad_port", "port (--port) must be >= 1"),
        ("bad_device", "device (--device) must be a torch device"),
    ],
)
def test_bad_inputs_stop_with_one_line_before_any_model_loads(erased, tmp_path, monkeypatch, capsys, case, expect):
    monkeypatch.setattr(command_module, "load_erased_pipeline", _fail_if_loaded)
    folder, extra = str(erased), []
    if case == "missing":
        folder = str(tmp_path / "nowhere")
    elif case == "not_a_pipeline":
        folder = str(tmp_path)
    elif case == "no_erasure":
        folder = str(save_tiny_sd(tmp_path / "plain"))
    elif case == "no_lora":
        folder = str(shutil.copytree(erased, tmp_path / "copy", ignore=shutil.ignore_patterns(LORA_WEIGHT_NAME)))
    elif case == "bad_port":
        extra = ["--port", "0"]
    else:
        extra = ["--device", "gpu-please"]
    capsys.readouterr()  # what making the folders printed
    with pytest.raises(SystemExit) as exit_info:
        command_module.main([folder, *extra])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("munba-app: error: ") and expect in lines[0], lines


def test_without_gradio_the_command_names_the_install(erased, monkeypatch):
    monkeypatch.setattr(command_module, "load_erased_pipeline", _fail_if_loaded)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real_find_spec(name, *a)
    )
    with pytest.raises(SystemExit) as exit_info:
        command_module.main([str(erased)])
    message = str(exit_info.value.code)
    assert "\n" not in message and 'pip install "munba-diffusion[app]"' in message


def test_the_folder_is_a_positional_argument(erased):
    config = parse_config(AppConfig, [str(erased), "--port", "8080", "--host", "0.0.0.0"])
    assert (config.output_dir, config.port, config.host, config.device) == (str(erased), 8080, "0.0.0.0", None)
    assert "OUTPUT_DIR" in build_parser(AppConfig).format_usage()


# ------------------------------------------------------------------------------------------ in a real browser
@pytest.fixture
def browser() -> tuple[str, str]:
    """(Chromium, chromedriver) from the system packages, or skip naming the install command (before any model is
    built); gradio and selenium come with the dev extra."""
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip(f"no headless Chromium and chromedriver for the browser test: {INSTALL_BROWSER}")
    for package in ("gradio", "selenium"):  # found, not imported (the app server imports gradio)
        if importlib.util.find_spec(package) is None:
            pytest.skip(f'no {package} for the browser test: pip install -e ".[dev]"')
    return chromium, driver


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_server(process: subprocess.Popen, url: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"munba-app exited with {process.returncode}: {process.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"munba-app did not serve {url} within {timeout:.0f} s")


def _image(url: str) -> Image.Image:
    with urllib.request.urlopen(url, timeout=30) as response:
        return Image.open(io.BytesIO(response.read())).convert("RGB")


def test_the_page_in_a_real_browser(browser, erased, pipeline, tmp_path):
    """munba-app serves the folder offline; headless Chromium types a prompt of the erased concept and generates:
    two different images appear (the ones generate gives); at erasure_scale 0 the right one is the original's."""
    chromium, chromedriver = browser
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    env.pop("GRADIO_ANALYTICS_ENABLED", None)  # the app turns analytics off itself
    command = [sys.executable, "-m", "munba_diffusion.commands.app", str(erased), "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    driver = None
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_for_server(server, url)
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=chromedriver))
        driver.get(url)
        wait = WebDriverWait(driver, 60)

        def set_number(element_id: str, value: str) -> None:
            box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"#{element_id} input[type=number]"))
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(value, Keys.ENTER)

        def images(previous: tuple[str, str] | None = None) -> tuple[str, str]:
            """The two images' URLs once both are shown (and the right one is not `previous`'s)."""

            def shown(d) -> tuple[str, str] | None:
                sources = [
                    e.get_attribute("src") for e in d.find_elements(By.CSS_SELECTOR, "#original img, #erased img")
                ]
                if len(sources) != 2 or not all(sources) or (previous and sources[1] == previous[1]):
                    return None
                return sources[0], sources[1]

            return wait.until(shown)

        prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        prompt.send_keys(Keys.CONTROL, "a")
        prompt.send_keys(PROMPT)
        set_number("steps", str(STEPS))
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        first = images()
        original, changed = _image(first[0]), _image(first[1])
        assert mean_difference(original, changed) > CLEARLY_DIFFERENT
        expected = generate(pipeline, PROMPT, seed=0, steps=STEPS, erasure_scale=1.0)  # the typed prompt and steps
        np.testing.assert_array_equal(pixels(original), pixels(expected[0]))
        np.testing.assert_array_equal(pixels(changed), pixels(expected[1]))

        set_number("erasure_scale", "0")
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        second = images(previous=first)
        np.testing.assert_array_equal(pixels(_image(second[1])), pixels(original))
        np.testing.assert_array_equal(pixels(_image(second[0])), pixels(original))
        loaded = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert loaded and [u for u in loaded if not u.startswith((url, "data:", "blob:"))] == []  # nothing from outside
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
