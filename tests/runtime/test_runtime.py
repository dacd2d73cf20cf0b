"""diffusion_tf.runtime: the options read from the environment once, their overrides, and
where the process-wide heap setting is applied."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from diffusion_tf import runtime

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("environ, expected", [
    ({}, runtime.Options(winograd=True, keep_heap=True, home=None)),
    ({"DIFFUSION_TF_WINOGRAD": "0", "DIFFUSION_TF_KEEP_HEAP": "0", "DIFFUSION_TF_HOME": "/w"},
     runtime.Options(winograd=False, keep_heap=False, home="/w")),
    ({"DIFFUSION_TF_WINOGRAD": "1", "DIFFUSION_TF_KEEP_HEAP": "", "DIFFUSION_TF_HOME": ""},
     runtime.Options(winograd=True, keep_heap=True, home=None)),  # only "0" turns a flag off
])
def test_from_environ(environ, expected):
    assert runtime.from_environ(environ) == expected


def test_options_are_read_once_per_process():
    code = (
        "import json, os\n"
        "from diffusion_tf import runtime\n"
        "first = runtime.options()\n"
        "os.environ.update(DIFFUSION_TF_WINOGRAD='1', DIFFUSION_TF_KEEP_HEAP='1', DIFFUSION_TF_HOME='/later')\n"
        "assert runtime.options() is first\n"
        "print(json.dumps([first.winograd, first.keep_heap, first.home]))\n"
    )
    env = dict(os.environ, DIFFUSION_TF_WINOGRAD="0", DIFFUSION_TF_KEEP_HEAP="0", DIFFUSION_TF_HOME="/first",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [False, False, "/first"]


def test_overridden_and_configure():
    before = runtime.options()
    with runtime.overridden(winograd=not before.winograd, home="/tmp/elsewhere") as inside:
        assert runtime.options() is inside
        assert inside.winograd is not before.winograd and inside.home == "/tmp/elsewhere"
        assert inside.keep_heap is before.keep_heap
    assert runtime.options() is before
    try:
        changed = runtime.configure(keep_heap=not before.keep_heap)
        assert runtime.options() is changed and changed.keep_heap is not before.keep_heap
    finally:
        runtime.configure(**{f: getattr(before, f) for f in ("winograd", "keep_heap", "home")})
    assert runtime.options() == before


@pytest.mark.parametrize("changes, message", [
    ({"winograd": "0"}, r"winograd='0'; must be True or False"),
    ({"keep_heap": 1}, r"keep_heap=1; must be True or False"),
    ({"home": ""}, r"home=''; must be a non-empty folder path or None"),
    ({"home": 3}, r"home=3; must be a non-empty folder path or None"),
    ({"heap": True}, r"unknown runtime option\(s\) heap; allowed: winograd, keep_heap, home"),
])
def test_bad_overrides_are_refused(changes, message):
    before = runtime.options()
    with pytest.raises(ValueError, match=message):
        runtime.configure(**changes)
    assert runtime.options() is before


def test_home_accepts_a_path():
    assert runtime.Options(home=pathlib.Path("/w")).home == "/w"


def test_only_the_runtime_module_reads_its_variables():
    import ast

    names = {"DIFFUSION_TF_WINOGRAD", "DIFFUSION_TF_KEEP_HEAP", "DIFFUSION_TF_HOME"}
    readers = set()
    for package in ("diffusion_tf", "weights_port"):
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):  # environ.get(NAME, ...), getenv(NAME), environ[NAME]
                keys = node.args if isinstance(node, ast.Call) else [node.slice] if isinstance(node, ast.Subscript) else []
                if any(isinstance(k, ast.Constant) and k.value in names for k in keys):
                    readers.add(path.relative_to(ROOT).as_posix())
    assert readers == {"diffusion_tf/runtime.py"}, readers


def test_load_folder_applies_the_heap_setting_after_loading(monkeypatch):
    from diffusion_tf import components, presets

    if not presets.builtin_available():
        pytest.skip("the built-in shapes model is not installed")
    loaded, applied = [], []
    real_load = components.load_weights
    monkeypatch.setattr(components, "load_weights", lambda model, path: loaded.append(path) or real_load(model, path))
    monkeypatch.setattr(runtime, "apply", lambda: applied.append(len(loaded)))
    parts = components.load_folder(presets.builtin_folder())
    assert applied == [3] and set(parts) >= {"text_encoder", "unet", "vae"}
    components.build_model("vae", parts["config"]["vae"])
    assert applied == [3]  # building a network changes no process state


def test_compile_cache_option():
    assert runtime.from_environ({}).compile_cache is False  # opt-in (see runtime.py)
    assert runtime.from_environ({"DIFFUSION_TF_COMPILE_CACHE": "0"}).compile_cache is False
    assert runtime.from_environ({"DIFFUSION_TF_COMPILE_CACHE": "1"}).compile_cache is True
    with pytest.raises(ValueError, match="compile_cache='yes'; must be True or False"):
        runtime.Options(compile_cache="yes")


def test_enable_compile_cache_adds_the_flag_once_per_version_folder(tmp_path):
    env = {"TF_XLA_FLAGS": "--tf_xla_auto_jit=0"}
    with runtime.overridden(home=str(tmp_path), compile_cache=True):
        folder = runtime.enable_compile_cache(env)
        assert folder == runtime.compile_cache_dir()
        assert folder.startswith(str(tmp_path / "xla-cache" / "tf-"))
        assert folder.endswith("-" + runtime.cpu_fingerprint()) and len(runtime.cpu_fingerprint()) == 12
        assert env["TF_XLA_FLAGS"] == f"--tf_xla_auto_jit=0 --tf_xla_persistent_cache_directory={folder}"
        assert runtime.enable_compile_cache(env) == folder  # a second call adds nothing
        assert env["TF_XLA_FLAGS"].count("persistent_cache_directory") == 1


def test_a_users_cache_flag_is_kept_and_the_option_can_turn_it_off(tmp_path):
    mine = {"TF_XLA_FLAGS": "--tf_xla_persistent_cache_directory=/elsewhere"}
    with runtime.overridden(home=str(tmp_path), compile_cache=True):
        assert runtime.enable_compile_cache(mine) == "/elsewhere"
    assert mine == {"TF_XLA_FLAGS": "--tf_xla_persistent_cache_directory=/elsewhere"}
    off = {}
    with runtime.overridden(home=str(tmp_path), compile_cache=False):
        assert runtime.enable_compile_cache(off) is None
    assert off == {} and not (tmp_path / "xla-cache").exists()


def test_tensorflow_defaults_leave_a_users_setting_alone():
    env = {}
    assert runtime.default_tensorflow_environ(env) == {"TF_ENABLE_ONEDNN_OPTS": "0"}
    assert env == {"TF_ENABLE_ONEDNN_OPTS": "0"}
    mine = {"TF_ENABLE_ONEDNN_OPTS": "1"}
    assert runtime.default_tensorflow_environ(mine) == {} and mine == {"TF_ENABLE_ONEDNN_OPTS": "1"}


_ONEDNN_PROBE = (
    "import diffusion_tf, tensorflow\n"
    "from tensorflow.python.util import _pywrap_util_port as port\n"
    "print('ONEDNN', port.IsMklEnabled())\n"
)


@pytest.mark.parametrize("given, expected", [(None, "False"), ("1", "True")])
def test_importing_diffusion_tf_first_turns_onednn_off_unless_asked(given, expected):
    """TensorFlow, imported after diffusion_tf, runs without oneDNN (its pooling allocator keeps
    freed temporaries resident; runtime.py) unless the user set TF_ENABLE_ONEDNN_OPTS."""
    env = dict(os.environ)
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    if given is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = given
    r = subprocess.run([sys.executable, "-c", _ONEDNN_PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"ONEDNN {expected}" in r.stdout


_CACHED_RUN = """
import sys
sys.path.insert(0, {tests!r})
from support import tiny_models
from diffusion_tf import Text2Image
t2i = Text2Image(model=tiny_models.converted_folder("tiny-sd1"), img_height=64, img_width=64, jit_compile=True)
image = t2i.generate("a red square", num_steps=2, seed=1)
print("IMAGE", int(image.astype("int64").sum()))
"""


@pytest.mark.integration
def test_a_second_process_loads_the_compiled_loop_from_the_cache(tmp_path):
    """The same generation in two fresh processes: the first writes XLA's executables under
    <home>/xla-cache/tf-<version>, the second loads them (TensorFlow's log says so) instead of
    compiling, and makes the same image."""
    env = dict(os.environ, DIFFUSION_TF_HOME=str(tmp_path), DIFFUSION_TF_COMPILE_CACHE="1",
               TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="device_executable_persistor=1")
    env.pop("TF_XLA_FLAGS", None)
    code = _CACHED_RUN.format(tests=str(ROOT / "tests"))
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    entries = list((tmp_path / "xla-cache").glob("tf-*/*.pb"))
    assert entries, "the first process wrote no cache entry"
    assert "Loading cached entry" not in runs[0].stderr
    assert "Loading cached entry" in runs[1].stderr
    images = [line for r in runs for line in r.stdout.splitlines() if line.startswith("IMAGE")]
    assert len(images) == 2 and images[0] == images[1]
