"""`python -m diffusion_tf info`: what this installation has and where its weights live.

    python -m diffusion_tf info          # version, backend, devices, models, cache, free disk
    python -m diffusion_tf info --json   # the same as JSON

The weights cache is `$DIFFUSION_TF_HOME`, else `~/.cache/diffusion_tf` (see
`diffusion_tf.presets`; read once, as the runtime's home option, `diffusion_tf.runtime`);
set DIFFUSION_TF_HOME to move it.
"""

import argparse
import json
import os
import shutil
import sys

EXIT_USAGE = 2


def _folder_bytes(folder):
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def collect(devices=True):
    """The facts `info` prints, as a dict. `devices=False` skips importing TensorFlow."""
    import diffusion_tf
    from diffusion_tf import presets, runtime

    cache = presets.cache_dir()
    usage = shutil.disk_usage(cache)
    info = {
        "diffusion_tf": diffusion_tf.__version__,
        "python": sys.version.split()[0],
        "keras_backend": os.environ.get("KERAS_BACKEND"),
        "cache": {
            "folder": cache,
            "set_by": "DIFFUSION_TF_HOME" if runtime.options().home else "default (~/.cache/diffusion_tf)",
            "free_bytes": usage.free,
        },
        "builtin_model": {"name": presets.BUILTIN_MODEL, "folder": presets.builtin_folder(),
                          "bytes": _folder_bytes(presets.builtin_folder())},
        "presets": {},
    }
    for name in presets.list_presets():
        folder = presets.preset_folder(name)
        cached = presets.is_cached(name)
        info["presets"][name] = {"cached": cached, "folder": folder, "bytes": _folder_bytes(folder) if cached else 0}
    default_folder, _ = presets.default_model()
    info["builtin_model"]["installed"] = presets.builtin_available()
    info["default_model"] = presets.BUILTIN_MODEL if default_folder == presets.builtin_folder() else presets.DEFAULT_PRESET
    if devices:
        import keras
        import tensorflow as tf

        info["tensorflow"] = tf.__version__
        info["keras"] = keras.__version__
        info["devices"] = [f"{d.device_type}:{d.name}" for d in tf.config.list_logical_devices()]
    return info


def _size(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def format_info(info):
    lines = [f"diffusion_tf {info['diffusion_tf']} (Python {info['python']})"]
    if "tensorflow" in info:
        lines.append(f"backend: Keras {info['keras']} on TensorFlow {info['tensorflow']}")
        lines.append(f"devices: {', '.join(info['devices'])}")
    c = info["cache"]
    lines.append(f"weights cache: {c['folder']} (set by {c['set_by']}); free disk there: {_size(c['free_bytes'])}")
    b = info["builtin_model"]
    lines.append(f"built-in model: {b['name']} " + (f"({_size(b['bytes'])}, {b['folder']})" if b["installed"]
                                                    else "(not installed in this checkout)"))
    lines.append("presets:")
    for name, p in info["presets"].items():
        state = f"cached, {_size(p['bytes'])}" if p["cached"] else "not downloaded"
        lines.append(f"  {name:14s} {state:22s} {p['folder']}")
    lines.append(f"default model: {info['default_model']}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m diffusion_tf", description="diffusion_tf utilities.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    i = sub.add_parser("info", help="version, backend, devices, models and where the weights cache is")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.add_argument("--no-devices", action="store_true", help="do not import TensorFlow to list the devices")
    args = p.parse_args(argv)
    if args.command != "info":
        p.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        info = collect(devices=not args.no_devices)
    except OSError as e:  # e.g. DIFFUSION_TF_HOME not creatable
        print(f"python -m diffusion_tf info: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(info, indent=1) if args.json else format_info(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
