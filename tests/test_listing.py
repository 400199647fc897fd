"""A prefix as a batch job's input: its validation, and which files the listing takes.

The listing runs on a real folder through ``Storage`` (the S3 side runs against SeaweedFS
in ``test_fanout.py``); recording it once is in ``test_bookkeeping.py``.
"""

from __future__ import annotations

import pytest

from ben2q.config import Settings
from ben2q.errors import InvalidRequest, NotFound
from ben2q.jobs import JobStatus, make_request
from ben2q.listing import list_images
from ben2q.storage import Storage


def test_a_prefix_is_a_batch_s_only_input_and_ends_with_a_slash(tmp_path):
    request = make_request("batch", [], "s3://cat-out/cutouts/", prefix="s3://cat-in/photos")
    assert request.prefix == "s3://cat-in/photos/" and request.inputs == []
    status = JobStatus.queued(request)
    assert status.items_apart and status.counts.total == 0 and status.prefix == request.prefix
    root = str(tmp_path)
    local = make_request(
        "batch", [], f"file://{root}/out/", prefix=f"file://{root}/in", local_root=root
    )
    assert local.prefix == f"file://{root}/in/"
    bad = [
        (("single", [], "s3://cat-out/x/"), {"prefix": "s3://cat-in/p/"}, "only a batch"),
        (
            ("batch", ["s3://cat-in/a.png"], "s3://cat-out/x/"),
            {"prefix": "s3://cat-in/p/"},
            "not both",
        ),
        (("batch", [], "s3://cat-out/x/"), {"prefix": "https://example.com/p/"}, "scheme"),
        (("batch", [], "s3://cat-out/x/"), {"prefix": "s3://Bad_Bucket/p/"}, "bucket"),
        (("batch", [], "s3://cat-out/x/"), {"prefix": "s3://cat-in/a/../b/"}, "'..'"),
        (("batch", [], "s3://cat-out/x/"), {"prefix": 7}, "must be"),
        (
            ("batch", [], f"file://{root}/o/"),
            {"prefix": "file:///etc/", "local_root": root},
            "outside",
        ),
    ]
    for args, kwargs, words in bad:
        with pytest.raises(InvalidRequest) as err:
            make_request(*args, **kwargs)
        assert err.value.field == "prefix" and words in str(err.value), (kwargs, str(err.value))
    with pytest.raises(InvalidRequest) as err:  # no prefix: inputs are needed as before
        make_request("batch", [], "s3://cat-out/x/")
    assert err.value.field == "inputs"


def test_the_listing_takes_images_in_order_and_skips_the_rest(tmp_path):
    root = tmp_path / "root"
    photos = root / "photos"
    (photos / "b").mkdir(parents=True)
    (photos / "cutouts").mkdir()
    for name in ("2.JPG", "1.png", "b/3.webp", "b/notes.txt", "cutouts/1.png", "4.tiff", "x.mask"):
        (photos / name).write_bytes(b"x")
    (photos / "link.png").symlink_to(photos / "1.png")  # not followed
    storage = Storage(Settings(local_root=root))
    found = list_images(
        storage,
        f"file://{photos}/",
        output=f"file://{photos}/cutouts/",
        limit=10,
        local_root=str(root),
    )
    names = [uri.rsplit("/photos/", 1)[1] for uri in found]
    assert names == ["1.png", "2.JPG", "4.tiff", "b/3.webp"]
    with pytest.raises(InvalidRequest) as err:
        list_images(
            storage, f"file://{photos}/", output="file:///x/", limit=3, local_root=str(root)
        )
    assert err.value.field == "prefix" and "more than 3" in str(err.value)
    (root / "empty").mkdir()
    with pytest.raises(NotFound):
        list_images(
            storage, f"file://{root}/empty/", output="file:///x/", limit=3, local_root=str(root)
        )
