"""Fuzzing, bounded for the suite: audio bytes into every decoder entry point (audio/io.py, the render
input path, the broadcast source decoder) and image bytes and avatar.json values into avatar loading.
Each gives a result or a ValueError-family error, within a deadline. The strategies and targets are
benchmarks/fuzz.py's, which runs them for as long as asked."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from benchmarks.fuzz import Workdir, audio_bytes, audio_targets, avatar_specs, expect_clear, image_bytes, \
    image_targets, spec_targets

pytestmark = pytest.mark.timeout(600)
BOUNDED = settings(max_examples=40, deadline=5000, database=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Workdir:
    return Workdir(tmp_path_factory.mktemp("fuzz"))


AUDIO = sorted(audio_targets(Workdir()))


@pytest.mark.parametrize("target", AUDIO)
def test_audio_bytes_give_a_result_or_a_clear_error(work, target):
    fn = audio_targets(work)[target]

    @BOUNDED
    @given(audio_bytes)
    def prop(data):
        expect_clear(fn, data)

    prop()


@pytest.mark.parametrize("target", ["decode_image", "prepare_avatar", "avatar_folder"])
def test_image_bytes_give_a_result_or_a_clear_error(work, engine, target):
    fn = image_targets(work, engine)[target]

    @BOUNDED
    @given(image_bytes)
    def prop(data):
        expect_clear(fn, data)

    prop()


def test_avatar_json_values_give_a_result_or_a_clear_error(work, engine):
    fn = spec_targets(work, engine)["avatar_spec"]

    @BOUNDED
    @given(avatar_specs())
    def prop(value):
        expect_clear(fn, value)

    prop()


def test_the_property_fails_on_other_exceptions():
    """expect_clear lets a ValueError pass and nothing else (so the fuzz tests can fail)."""
    def raises(exc):
        def fn(_):
            raise exc
        return fn

    expect_clear(raises(ValueError("fine")), b"")
    for bad in (TypeError("x"), KeyError("k"), OSError("o"), AssertionError("a")):
        with pytest.raises(type(bad)):
            expect_clear(raises(bad), b"")
