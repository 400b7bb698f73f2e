"""Reading shard tars (docs/architecture.md §2) and turning members into raw samples (§1).

Every problem with a sample is a ``SampleError`` with a reason code; the loader either counts it
(``on_error: skip``) or raises it (``on_error: fail``). The message always names the shard URL and
the sample key. Reasons:

* ``corrupt_tar``: the tar could not be read to the sample (truncated file, bad header, I/O
  error), or the shard holds fewer samples than its manifest entry says
* ``bad_json``: no ``.json`` member, not UTF-8 JSON, or missing/ill-typed fields
* ``bad_image``: an image member PIL cannot decode
* ``tiny_image``: an image smaller than ``min_image_side`` (e.g. 1x1 placeholders)
* ``image_count_mismatch``: number of ``<image>`` placeholders, image members and the JSON's
  ``images`` list disagree
* ``too_long``: the transform (processor) said the image tokens alone exceed max_length

Stage 1 additionally *filters* (not errors, never raised): ``unlabelled`` (label None),
``multi_view`` (more than one image: the label is per object, and a defect is often visible in
only some of the views, so using it as every view's label would be noise) and ``no_image``.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from typing import IO, Iterator, Optional, Union

from PIL import Image

SKIP_REASONS = ("corrupt_tar", "bad_json", "bad_image", "tiny_image", "image_count_mismatch",
                "too_long")
FILTER_REASONS = ("unlabelled", "multi_view", "no_image")
IMAGE_TOKEN = "<image>"
_IMG_SUFFIX = re.compile(r"^img(\d+)\.[A-Za-z0-9]+$")


_MESSAGE = re.compile(r"(\w+): shard (\S+) sample '([^']*)': ")


class SampleError(Exception):
    """A bad sample; ``reason`` is one of SKIP_REASONS or FILTER_REASONS."""

    def __init__(self, reason: str, url: Optional[str] = None, key: Optional[str] = None,
                 detail: str = ""):
        if url is None:
            # re-raised from a DataLoader worker: torch rebuilds the exception from its message
            # text (with the worker's traceback); recover the fields from it
            super().__init__(reason)
            m = _MESSAGE.search(reason.rsplit("SampleError: ", 1)[-1])
            self.reason, self.url, self.key = (m.groups() if m else ("unknown", "", ""))
            self.detail = reason
            return
        super().__init__(f"{reason}: shard {url} sample {key!r}: {detail}")
        self.reason, self.url, self.key, self.detail = reason, url, str(key), detail


Members = dict[str, bytes]  # suffix (after the key's dot) -> bytes


def iter_tar_samples(fileobj: IO[bytes], url: str, stop: Optional[int] = None,
                     expected: Optional[int] = None
                     ) -> Iterator[Union[tuple[str, Members], SampleError]]:
    """Samples of a shard in file order: (key, members), grouped by consecutive equal keys.

    Yields at most ``stop`` samples (the reader stops early instead of reading the whole shard).
    A read error ends the shard with a single ``corrupt_tar`` SampleError (key = last key seen).
    Python's tarfile ends a stream *silently* at a damaged header, so when the shard holds fewer
    than ``expected`` samples the last group (possibly cut short) is reported as that error too.
    """
    key: Optional[str] = None
    members: Members = {}
    count = 0
    last = "<start of shard>"
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                name = info.name.rsplit("/", 1)[-1]
                k, dot, suffix = name.partition(".")
                if not dot:
                    continue  # no suffix: not part of a sample (webdataset ignores these too)
                if k != key:
                    # hand out the finished sample before reading on: a damaged next member
                    # must not take a complete sample down with it
                    if key is not None:
                        yield key, members
                        last = key
                        count += 1
                        if stop is not None and count >= stop:
                            return
                    key, members = k, {}
                f = tf.extractfile(info)
                members[suffix] = f.read() if f is not None else b""
        if key is not None:
            if expected is not None and count + 1 < expected:
                yield SampleError("corrupt_tar", url, key, f"tar ended after {count + 1} of "
                                  f"{expected} samples (damaged header?); this sample may be cut")
                return
            yield key, members
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        yield SampleError("corrupt_tar", url, key or last, f"tar read failed after this key: "
                                                             f"{type(e).__name__}: {e}")


def _check_conversations(conv: object) -> bool:
    return isinstance(conv, list) and len(conv) > 0 and all(
        isinstance(t, dict) and t.get("from") in ("human", "gpt") and isinstance(t.get("value"), str)
        for t in conv)


def decode_sample(members: Members, key: str, url: str, dataset: str, *, stage: str,
                  min_image_side: int) -> dict:
    """Members of one tar sample -> raw sample dict (docs/architecture.md §1) or SampleError."""
    if "json" not in members:
        raise SampleError("bad_json", url, key, f"no {key}.json member (members: {sorted(members)})")
    try:
        meta = json.loads(members["json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SampleError("bad_json", url, key, f"{key}.json is not UTF-8 JSON: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("id"), str):
        raise SampleError("bad_json", url, key, f"{key}.json needs an object with a string 'id'")
    if not _check_conversations(meta.get("conversations")):
        raise SampleError("bad_json", url, key, f"{key}.json (id {meta['id']!r}): 'conversations' "
                          "must be a non-empty list of {from: human|gpt, value: str}")
    label = meta.get("label")
    if label not in (0, 1, None) or isinstance(label, bool):
        raise SampleError("bad_json", url, key, f"{key}.json (id {meta['id']!r}): label must be "
                          f"0, 1 or null, got {label!r}")
    image_members = []
    for suffix in members:
        m = _IMG_SUFFIX.match(suffix)
        if m:
            image_members.append((int(m.group(1)), suffix))
    image_members.sort()
    listed = meta.get("images") or []
    n_placeholders = sum(t["value"].count(IMAGE_TOKEN) for t in meta["conversations"])
    if [i for i, _ in image_members] != list(range(len(image_members))) \
            or not (len(image_members) == len(listed) == n_placeholders):
        raise SampleError("image_count_mismatch", url, key,
                          f"id {meta['id']!r}: {n_placeholders} {IMAGE_TOKEN} placeholders, "
                          f"{len(image_members)} image members {[s for _, s in image_members]}, "
                          f"{len(listed)} entries in 'images'")
    if stage == "stage1":
        # filters come before image decoding: they are cheap and decide most stage-1 skips
        if label is None:
            raise SampleError("unlabelled", url, key, f"id {meta['id']!r} has no label")
        if len(image_members) > 1:
            raise SampleError("multi_view", url, key, f"id {meta['id']!r} has "
                              f"{len(image_members)} views")
        if not image_members:
            raise SampleError("no_image", url, key, f"id {meta['id']!r} has no image")
    images = []
    for _, suffix in image_members:
        try:
            im = Image.open(io.BytesIO(members[suffix]))
            im.load()
            # convert() copies even when the mode is already RGB: skip that copy
            rgb = im if im.mode == "RGB" else im.convert("RGB")
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
            raise SampleError("bad_image", url, key, f"id {meta['id']!r}: {key}.{suffix} cannot be "
                              f"decoded: {type(e).__name__}: {e}") from None
        if min(rgb.size) < min_image_side:
            raise SampleError("tiny_image", url, key, f"id {meta['id']!r}: {key}.{suffix} is "
                              f"{rgb.size[0]}x{rgb.size[1]} (min side {min_image_side})")
        images.append(rgb)
    return {
        "id": meta["id"],
        "images": images,
        "conversations": meta["conversations"],
        "label": label,
        "source": meta.get("source") or dataset,
        "__key__": key,
        "__url__": url,
    }
