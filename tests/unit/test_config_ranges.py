"""Every numeric setting of every job has a declared valid range, checked on load with its dotted key.

The cases are generated from the config classes of the CLI's ``JOBS`` table: a new int/float field
(or list of them) anywhere in a job's config tree fails here until it is declared with
``num(default, ge=..., ...)`` and a value outside that range is refused by ``load_config``.
"""
from __future__ import annotations

import dataclasses
import types
import typing

import pytest

from kale_ray import cli
from kale_ray.config import ConfigError, Range, SynthConfig, load_config, num, range_of

NUMERIC = (int, float)


def _numeric(tp) -> type | None:
    """int / float for a numeric (or list-of-numeric) annotation, else None."""
    if tp in NUMERIC:
        return tp
    if typing.get_origin(tp) is list and typing.get_args(tp) and typing.get_args(tp)[0] in NUMERIC:
        return typing.get_args(tp)[0]
    return None


def _walk(cls: type, prefix: str = ""):
    """(dotted key, owning class, field, numeric type, is_list) for every numeric field under ``cls``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        options = ([a for a in typing.get_args(tp) if a is not type(None)]
                   if typing.get_origin(tp) in (typing.Union, types.UnionType) else [tp])
        for a in options:
            if dataclasses.is_dataclass(a):
                yield from _walk(a, key + ".")
            elif (n := _numeric(a)) is not None:
                yield key, cls, f, n, a is not n


def _defaults(obj, prefix: str = ""):
    """(dotted key, field, value) for every numeric field of a default config instance."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _defaults(value, f"{prefix}{f.name}.")
        elif range_of(f) is not None:
            yield f"{prefix}{f.name}", f, value


JOB_NAMES = [j for j in cli.JOBS if j not in cli.ALIASES]
CASES = [(job, key, owner, f, n, is_list) for job in JOB_NAMES for key, owner, f, n, is_list in _walk(cli.JOBS[job][0])]


def _outside(r: Range, n: type) -> list:
    """A value just outside each declared bound of ``r``."""
    step = 1 if n is int else 0.5
    out = []
    if r.gt is not None:
        out.append(n(r.gt))
    elif r.ge is not None:
        out.append(n(r.ge - step))
    if r.lt is not None:
        out.append(n(r.lt))
    elif r.le is not None:
        out.append(n(r.le + step))
    return out


def test_the_walk_finds_the_issue_keys():
    keys = {(job, key) for job, key, *_ in CASES}
    for key in ("qa.num_questions", "qa.test_fraction", "shard_size", "paths.k", "paths.max_hops", "qa.hops"):
        assert ("synthesize", key) in keys
    assert ("kale", "synth.shard_size") in keys and ("kard", "teacher.verifier_model.max_model_len") in keys
    assert len(CASES) > 200


@pytest.mark.parametrize("job,key,owner,f,n,is_list", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_every_numeric_key_has_a_range_and_out_of_range_is_refused(job, key, owner, f, n, is_list):
    r = range_of(f)
    assert r is not None, (f"{owner.__module__}.{owner.__name__}.{f.name} ({job}: {key}) has no valid range: "
                           f"declare it as `{f.name}: {n.__name__} = num(<default>, ge=..., le=...)`")
    bads = _outside(r, n)
    assert bads, f"{key}: a range needs at least one bound"
    cls = cli.JOBS[job][0]
    for bad in bads:
        value = [bad] if is_list else bad
        with pytest.raises(ConfigError) as ei:
            load_config(cls, None, [f"{key}={value!r}"])
        msg = str(ei.value)
        assert key in msg and len(msg.splitlines()) == 1, msg


@pytest.mark.parametrize("job", JOB_NAMES)
def test_every_default_is_inside_its_range(job):
    cfg = cli.JOBS[job][0]()
    for key, f, value in _defaults(cfg):
        for x in value if isinstance(value, list) else [value]:
            assert x in range_of(f), f"{job}: default {key}={x} is outside its range {range_of(f)}"


@pytest.mark.parametrize("override,message", [
    ("qa.num_questions=-5", "qa.num_questions: must be >= 1, got -5"),
    ("qa.test_fraction=1.5", "qa.test_fraction: must be in [0, 1), got 1.5"),
    ("shard_size=0", "shard_size: must be >= 1, got 0"),
    ("paths.k=0", "paths.k: must be >= 1, got 0"),
    ("paths.max_hops=0", "paths.max_hops: must be >= 1, got 0"),
    ("qa.hops=[1, 0]", "qa.hops[1]: must be >= 1, got 0"),
    ("generation.top_p=0", "generation.top_p: must be in (0, 1], got 0.0"),
])
def test_synthesize_range_messages(override, message):
    with pytest.raises(ConfigError) as ei:
        load_config(SynthConfig, None, [override])
    assert str(ei.value) == message


def test_nested_sections_name_the_full_key():
    from kale_ray.config import KALEJobConfig

    with pytest.raises(ConfigError, match=r"^synth\.shard_size: must be >= 1, got 0$"):
        load_config(KALEJobConfig, None, ["synth.shard_size=0"])
    with pytest.raises(ConfigError, match=r"^eval\.generation\.max_tokens: must be >= 1, got 0$"):
        load_config(KALEJobConfig, None, ["eval.generation.max_tokens=0"])


def test_boundaries_are_inside():
    cfg = load_config(SynthConfig, None, ["qa.test_fraction=0", "generation.top_p=1", "shard_size=1", "paths.k=1"])
    assert (cfg.qa.test_fraction, cfg.generation.top_p, cfg.shard_size, cfg.paths.k) == (0.0, 1.0, 1, 1)


def test_range_text_and_num_needs_a_bound():
    assert [str(Range(ge=1)), str(Range(gt=0)), str(Range(ge=0, lt=1)), str(Range(gt=0, le=1)), str(Range(le=5))] == \
        [">= 1", "> 0", "in [0, 1)", "in (0, 1]", "<= 5"]
    with pytest.raises(TypeError):
        num(3)
