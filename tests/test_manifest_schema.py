"""The manifest's one schema (mla_edge.manifest_schema): every writer's output conforms, the reader refuses what breaks
it in one line naming the field, and the JSON copy the Android engine's tests read is the schema itself."""

import copy
import json
from pathlib import Path

import pytest

from mla_edge.contract import MANIFEST
from mla_edge.manifest_schema import MANIFEST_SCHEMA, problems, to_json
from mla_edge.runtime.manifest import Manifest, ManifestError, check_written

ANDROID_COPY = Path(__file__).parent.parent / "android_demo/app/src/test/resources/manifest_schema.json"


def test_the_android_copy_is_the_schema():
    """Regenerate with: python -m mla_edge.manifest_schema > android_demo/app/src/test/resources/manifest_schema.json"""
    assert ANDROID_COPY.read_text() == to_json()
    assert json.loads(ANDROID_COPY.read_text()) == json.loads(json.dumps(MANIFEST_SCHEMA))


def test_an_export_conforms(text_export):
    data = json.loads((text_export[1] / MANIFEST).read_text())
    assert problems(data) == []
    assert Manifest.read(text_export[1]).data == data


def _set(data, dotted, value):
    *path, last = dotted.split(".")
    for k in path:
        data = data[int(k)] if k.isdigit() else data[k]
    if value is KeyError:
        del data[last]
    else:
        data[int(last) if last.isdigit() else last] = value


@pytest.mark.parametrize(
    "field,value,expect",
    [
        ("cache.dtype", "fp64", "'cache.dtype' is 'fp64', not one of fp32, fp16, int8"),
        ("cache.bytes_per_token", -1, "'cache.bytes_per_token' must be >= 0"),
        ("tokens.bos", "0", "'tokens.bos' must be integer or null"),
        ("tokens.eos", [0, "x"], "'tokens.eos[1]' must be integer"),
        ("files.int8.files.0.sha256", "abc", "'files.int8.files[0].sha256' 'abc' is not a"),
        ("files.int8.bytes", KeyError, "'files.int8.bytes' is missing"),
        ("files.int3", {"precision": "int3", "path": "m.onnx", "bytes": 1, "files": []}, "'files.int3 (a key)'"),
        ("graph.inputs.0.name", 3, "'graph.inputs[0].name' must be string"),
        ("tokenizer", 5, "'tokenizer' must be string or null"),
        ("surprise", 1, "'surprise' is not a field of format_version 2"),
        ("max_context", KeyError, "'max_context' is missing"),
    ],
)
def test_a_manifest_that_breaks_the_schema_is_one_line_naming_the_field(text_export, tmp_path, field, value, expect):
    import shutil

    out = shutil.copytree(text_export[1], tmp_path / "out")
    data = json.loads((out / MANIFEST).read_text())
    broken = copy.deepcopy(data)
    _set(broken, field, value)
    (out / MANIFEST).write_text(json.dumps(broken))
    with pytest.raises(ManifestError) as e:
        Manifest.read(out)
    assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(RuntimeError, match="breaks its schema"):  # and no writer can write it
        check_written(broken)
