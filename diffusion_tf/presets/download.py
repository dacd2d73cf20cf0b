"""Fetching a preset's checkpoint into the cache, verified against its pinned sha256."""

import os

from diffusion_tf.presets import cache


class PresetUnavailableError(ValueError):
    """A preset's weights are not on disk and could not (or may not) be downloaded."""


def fetch(name, folder, ckpt, command=None, use="model"):
    """Download the checkpoint `ckpt` (a preset's "checkpoint" entry, with a pinned sha256) into
    <cache>/downloads, verified; its path. Any failure raises PresetUnavailableError saying how
    to install the weights of preset `name` into `folder` by hand (`command`: the conversion to
    run on the downloaded file, default weights_port's with --config NAME; `use`: the argument that
    takes the folder)."""
    url, filename, sha256 = ckpt["url"], ckpt["filename"], ckpt["sha256"]
    root = cache.cache_dir()
    target = os.path.join(root, "downloads", filename)
    if not os.access(root, os.W_OK):
        raise PresetUnavailableError(
            unavailable(name, folder, ckpt, f"the cache folder {root!r} is not writable (set DIFFUSION_TF_HOME)",
                        command, use)
        )
    import keras

    try:
        return keras.utils.get_file(
            filename,
            origin=url,
            file_hash=sha256,
            hash_algorithm="sha256",
            cache_dir=root,
            cache_subdir="downloads",
        )
    except Exception as e:
        # get_file removes an interrupted download itself, but keeps a complete
        # file whose hash does not match: remove it. (A file left by an interrupt
        # during verification is verified again before any use.)
        if os.path.exists(target):
            os.remove(target)
        reason = str(e) if type(e) is Exception else f"{type(e).__name__}: {e}"
        reason = " ".join(reason.split()).rstrip(".") or type(e).__name__
        if len(reason) > 300:
            reason = reason[:297] + "..."
        raise PresetUnavailableError(
            unavailable(name, folder, ckpt, f"downloading the checkpoint from {url} failed ({reason})", command, use)
        ) from e


def unavailable(name, folder, ckpt, why, command=None, use="model"):
    """The message of a PresetUnavailableError: what is missing, why, and the manual install
    (`command`: the conversion, "{file}" standing for the downloaded file; default weights_port's;
    `use`: the argument that takes the converted folder)."""
    sha = ckpt.get("sha256")
    check = f" (sha256 {sha})" if sha else ""
    command = command or f"python -m weights_port {{file}} {folder} --config {name}"
    command = command.replace("{file}", "<downloaded file>")
    return (
        f"preset {name!r}: the converted weights are not on disk at {folder}, and {why}. "
        f"To install them by hand, download {ckpt['filename']}{check} from {ckpt['url']} "
        f"on a machine that can reach it, then run:\n"
        f"    {command}\n"
        f"(or convert it into any folder and pass {use}=<that folder>)."
    )
