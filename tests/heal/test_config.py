"""heal.config: YAML/JSON loading validated against a dataclass schema, errors naming the field."""

import argparse
import dataclasses
from typing import Dict, List, Literal, Optional

import pytest

from heal.config import config_from_dict, load_config, merge_args, read_config_file


@dataclasses.dataclass
class Inner:
    rate: float = 0.5
    names: List[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Schema:
    path: str
    k: int = 32
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    steps: Optional[int] = None
    mapping: Dict[str, str] = dataclasses.field(default_factory=dict)
    inner: Inner = dataclasses.field(default_factory=Inner)

    def validate(self):
        if self.k < 1:
            raise ValueError(f"field 'k' must be >= 1, got {self.k}")


def test_yaml_and_json_load(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("path: x.parquet\nk: 8\nflag: true\nmode: b\nsteps: 3\nmapping: {question: Q}\n"
                 "inner: {rate: 1, names: [u, v]}\n")
    cfg = load_config(y, Schema)
    assert cfg == Schema(path="x.parquet", k=8, flag=True, mode="b", steps=3, mapping={"question": "Q"},
                         inner=Inner(rate=1.0, names=["u", "v"]))
    assert isinstance(cfg.inner.rate, float)
    j = tmp_path / "c.json"
    j.write_text('{"path": "p", "steps": null}')
    assert load_config(j, Schema) == Schema(path="p")


@pytest.mark.parametrize(
    "data, match",
    [
        ({"path": "p", "kk": 1}, "unknown field 'kk'"),
        ({"path": "p", "k": "32x"}, "field 'k': expected int, got str '32x'"),
        ({"path": "p", "k": True}, "field 'k': expected int"),
        ({"path": "p", "flag": "yes"}, "field 'flag': expected true/false"),
        ({"path": "p", "mode": "c"}, "field 'mode': must be one of \\['a', 'b'\\]"),
        ({"path": "p", "steps": 1.5}, "field 'steps': expected int"),
        ({"path": "p", "mapping": ["x"]}, "field 'mapping': expected a mapping"),
        ({"path": "p", "mapping": {"q": 1}}, "field 'mapping.q': expected str"),
        ({"path": "p", "inner": {"rate": "fast"}}, "field 'inner.rate': expected float"),
        ({"path": "p", "inner": {"names": "u"}}, "field 'inner.names': expected a list"),
        ({"path": "p", "inner": {"names": ["u", 3]}}, "field 'inner.names\\[1\\]': expected str"),
        ({"path": "p", "inner": {"bogus": 1}}, "unknown field 'inner.bogus'"),
        ({"k": 3}, "missing field 'path'"),
        ({"path": "p", "k": 0}, "field 'k' must be >= 1"),  # the schema's validate()
    ],
)
def test_errors_name_the_field(data, match):
    with pytest.raises(ValueError, match=match):
        config_from_dict(data, Schema)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml", Schema)
    bad = tmp_path / "bad.yaml"
    bad.write_text("path: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml: cannot parse"):
        load_config(bad, Schema)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="top level must be a mapping"):
        load_config(lst, Schema)
    txt = tmp_path / "c.txt"
    txt.write_text("path: p")
    with pytest.raises(ValueError, match=".yaml, .yml or .json"):
        load_config(txt, Schema)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("path: p\nk: many\n")
    with pytest.raises(ValueError, match="wrong.yaml: field 'k'"):
        load_config(wrong, Schema)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert read_config_file(empty) == {}


def test_merge_args_cli_overrides_file_values():
    cfg = Schema(path="file", k=8, inner=Inner(rate=2.0))
    args = argparse.Namespace(path=None, k=16, flag=None, steps=None)
    merged = merge_args(cfg, args)
    assert merged.path == "file" and merged.k == 16 and merged.inner.rate == 2.0
    with pytest.raises(ValueError, match="field 'k': expected int"):
        merge_args(cfg, argparse.Namespace(k="x"), ["k"])
    with pytest.raises(ValueError, match="unknown field 'zz'"):
        merge_args(cfg, argparse.Namespace(zz=1), ["zz"])


def test_schema_must_be_a_dataclass():
    with pytest.raises(TypeError, match="schema"):
        config_from_dict({}, dict)
