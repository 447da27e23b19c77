"""Property-based fuzzing (hypothesis): sampling options, prompts and stop strings, the manifest reader and memory
sizes either work or raise mla-edge's documented error type (InputError) -- never anything else."""

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mla_edge.contract import FORMAT, FORMAT_VERSION, MANIFEST, InputError
from mla_edge.runtime.budget import parse_memory
from mla_edge.runtime.generate import Generator
from mla_edge.runtime.manifest import Manifest
from mla_edge.runtime.sampling import Sampler, SamplingOptions

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5)
)


@pytest.fixture(scope="module")
def gen(text_export):
    return Generator(text_export[1], "fp32", provider="cpu")


@FAST
@given(temperature=ANY, top_k=ANY, top_p=ANY, repetition_penalty=ANY, seed=ANY)
def test_sampling_options_validate_or_sample(temperature, top_k, top_p, repetition_penalty, seed):
    try:
        opts = SamplingOptions(temperature, top_k, top_p, repetition_penalty, seed)
    except InputError:
        return
    picks = Sampler(opts)(np.random.default_rng(0).normal(size=(2, 50)), [[1, 2], [3]])
    assert picks.shape == (2,) and all(0 <= int(p) < 50 for p in picks)


@FAST
@given(
    prompt=st.one_of(st.text(max_size=40), st.none(), st.integers(), st.binary(max_size=8)),
    stop=st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=3), st.lists(st.integers(), max_size=2)),
    max_new=st.one_of(st.integers(-2, 4), st.floats(0, 3)),
)
def test_prompts_and_stop_strings(gen, prompt, stop, max_new):
    try:
        r = gen.generate(prompt, max_new_tokens=max_new, stop=stop, eos=False)
    except InputError:
        return
    assert r.finish_reason in ("stop", "length") and isinstance(r.text, str) and len(r.token_ids) <= max_new


JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)


@FAST
@given(
    extra=st.dictionaries(
        st.sampled_from(["model", "cache", "tokens", "files", "graph", "tokenizer", "static"]), JSONISH, max_size=5
    ),
    version=st.sampled_from([FORMAT_VERSION, 1, "2", None]),
)
def test_manifest_reader(gen, tmp_path_factory, extra, version):
    folder = tmp_path_factory.mktemp("m")
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "format_version": version, **extra}))
    try:
        m = Manifest.read(folder)
        m.precisions, m.past_names, m.tokenizer_path  # noqa: B018 - reading them must not fail either
    except InputError:
        return
    except (AttributeError, TypeError, KeyError, IndexError):
        pytest.fail("a malformed manifest must be a ManifestError")


@FAST
@given(raw=st.binary(max_size=64))
def test_manifest_bytes(tmp_path_factory, raw):
    folder = tmp_path_factory.mktemp("b")
    (folder / MANIFEST).write_bytes(raw)
    with pytest.raises(InputError):
        Manifest.read(folder)


@FAST
@given(text=st.text(max_size=12))
def test_memory_sizes(text):
    try:
        assert parse_memory(text) > 0
    except InputError:
        pass
