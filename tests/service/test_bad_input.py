"""Bodies that are not JSON get a 400 naming why; numbers at the edges of the fields' ranges."""

from __future__ import annotations

import sys

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"class_label": "\xff\xfe"}', "body: not valid UTF-8"),
        (b'{"class_label": 1, "seed": ' + b"7" * 4301 + b"}", "body: integer too large"),
        (b"[" * 8000 + b"]" * 8000, "body: nested too deeply"),
        (b'{"class_label": 1, "seed": ' + b'{"a": ' * 2000 + b"1" + b"}" * 2001, "body: nested too deeply"),
        (b'{"class_label": 1', "body: malformed JSON"),
    ],
    ids=["invalid-utf8", "4301-digit-integer", "8000-deep-list", "2000-deep-object", "truncated"],
)
def test_unparseable_bodies_are_400_naming_the_problem(client, body: bytes, message: str) -> None:
    # A `lowdiff serve` process has Python's default recursion limit, which is what makes deep nesting
    # a parse error; other tests in this process (import-linter's graph) may have raised it.
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        r = client.post("/generate", content=body, headers=JSON)
    finally:
        sys.setrecursionlimit(before)
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(message), r.json()
    assert r.json()["field"] == "body"
    assert "There was an error parsing the body" not in r.text


def test_the_smallest_positive_double_is_not_a_timeout(client) -> None:
    r = client.post("/generate", content=b'{"class_label": 1, "timeout_s": 5e-324}', headers=JSON)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "timeout_s"
    assert r.json()["error"].startswith("timeout_s: ")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"class_label": 1.5}', "class_label"),
        ('{"class_label": 1, "seed": 1e300}', "seed"),
        ('{"class_label": 1, "num_images": 1e400}', "num_images"),  # 1e400 is inf to Python's parser
        ('{"class_label": 1, "timeout_s": NaN}', "timeout_s"),
        ('{"class_label": true}', "class_label"),
    ],
)
def test_numbers_that_are_not_the_fields_integers(client, body: str, field: str) -> None:
    r = client.post("/generate", content=body, headers=JSON)
    assert (r.status_code, r.json()["field"]) == (422, field), r.text


def test_integral_floats_are_integers(client) -> None:
    """JSON (and the schema's "integer") do not tell 2.0 from 2."""
    r = client.post("/generate", content=b'{"class_label": 2.0, "seed": 5.0, "num_images": 2.0}', headers=JSON)
    assert r.status_code == 200, r.text
    assert [im["seed"] for im in r.json()["images"]] == [5, 6]
    assert {im["class_label"] for im in r.json()["images"]} == {2}
