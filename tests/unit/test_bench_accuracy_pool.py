"""bench_accuracy's pooling: seeds pool from their stored counts exactly as from their predictions, so a
call that adds seeds (or KA points) to an entry reports the same numbers as one call over every seed; and an
entry made under other settings never pools."""
from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_accuracy as ba  # noqa: E402


def _preds(rng: random.Random, n: int, p_right: float) -> dict:
    out: dict = {"questions": {}, "probes": {}, "hops": {}, "unparsed": {}}
    for i in range(n):
        q = f"q{i}"
        h = rng.choice([2, 3])
        out["questions"][q] = rng.random() < p_right
        out["hops"][q] = h
        out["unparsed"][q] = rng.random() < 0.1
        if rng.random() < 0.9:  # a few questions without probes
            out["probes"][q] = [rng.random() < 0.7 for _ in range(h)]
    return out


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12), (path, a, b)
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pooled_counts_equal_pooled_predictions(seed):
    rng = random.Random(seed)
    seeds = [(s, _preds(rng, rng.randint(20, 60), 0.45), _preds(rng, rng.randint(20, 60), 0.4)) for s in range(4)]
    # the same questions under SFT and KALE within a seed (paired), different questions across seeds
    seeds = [(s, a, {**b, "questions": {q: b["questions"].get(q, False) for q in a["questions"]},
                     "hops": a["hops"], "probes": {q: v for q, v in b["probes"].items() if q in a["questions"]},
                     "unparsed": {q: b["unparsed"].get(q, False) for q in a["questions"]}}) for s, a, b in seeds]
    from_preds = ba.compare(ba.seeded([(s, a) for s, a, _ in seeds]), ba.seeded([(s, b) for s, _, b in seeds]))
    from_counts = ba.pool_compares([ba.compare(a, b) for _, a, b in seeds])
    _close(from_preds, from_counts)


def test_paired_from_counts_is_the_sample_interval():
    d = [1] * 7 + [-1] * 3 + [0] * 30
    import statistics

    r = ba.paired_from_counts(len(d), 7, 3)
    half = 1.96 * statistics.stdev(d) / math.sqrt(len(d))
    assert r["diff"] == pytest.approx(0.1)
    assert r["ci95"] == pytest.approx([0.1 - half, 0.1 + half])
    one = ba.paired_from_counts(1, 1, 0)  # too few for an interval, but the counts are kept
    assert math.isnan(one["diff"]) and one["kale_only_right"] == 1


def test_stored_counts_without_correct_read_back_from_accuracy():
    r = ba.rates({"n": 59, "correct": 25, "n_probed": 59, "n_known": 21, "n_ki": 8})
    old = {k: v for k, v in r.items() if k != "correct"}  # entries written before "correct" was stored
    assert ba._counts_of(old) == ba._counts_of(r) == {"n": 59, "correct": 25, "n_probed": 59, "n_known": 21, "n_ki": 8}


def test_merge_keeps_stored_seeds_and_points_this_call_did_not_run():
    stored = [{"seed": 0, "v": "old"}, {"seed": 1, "v": "old"}]
    merged = ba.merge_seeds(stored, [{"seed": 1, "v": "new"}, {"seed": 3, "v": "new"}])
    assert [(r["seed"], r["v"]) for r in merged] == [(0, "old"), (1, "new"), (3, "new")]
    grid = ba.merge_grid([{"name": "T2", "seed": 0, "v": "old"}, {"name": "reverse", "seed": 0, "v": "old"}],
                         [{"name": "T2", "seed": 0, "v": "new"}, {"name": "T2", "seed": 3, "v": "new"}])
    assert [(g["name"], g["seed"], g["v"]) for g in grid] == [("reverse", 0, "old"), ("T2", 0, "new"), ("T2", 3, "new")]


def test_other_settings_never_pool():
    entry = {"size": "testbed", "config": {"size_overrides": ba.SIZES["testbed"], "extra_overrides": ["eval_base=false"]}}
    assert ba.same_settings(entry, "testbed", ["eval_base=false"])
    assert not ba.same_settings(entry, "testbed", ["eval_base=false", "train.epochs=2"])
    assert not ba.same_settings(entry, "smoke", ["eval_base=false"])
    # the base model's evaluation adds a measurement and changes nothing compared: the seeds still pool
    assert ba.same_settings(entry, "testbed", []) and ba.same_settings(entry, "testbed", ["eval_base=true"])
    changed = {**entry, "config": {**entry["config"], "size_overrides": ba.SIZES["testbed"][:-1]}}
    assert not ba.same_settings(changed, "testbed", ["eval_base=false"])


def test_ka_setting_pooled_beside_the_default_at_the_same_seeds():
    rng = random.Random(7)
    per_seed, grid = [], []
    for s in (0, 3, 4):
        a = _preds(rng, 30, 0.5)
        b = {**a, "questions": {q: rng.random() < 0.4 for q in a["questions"]}}
        c = {**a, "questions": {q: rng.random() < 0.5 for q in a["questions"]}}
        per_seed.append({"seed": s, "compare": ba.compare(a, b)})
        if s != 4:
            grid.append({"name": "teacher_ce1", "seed": s, "overrides": ["x=1"], "compare": ba.compare(a, c)})
    pooled = ba.pool_grid(grid, per_seed + [{"seed": 9, "compare": per_seed[0]["compare"]}])
    p = pooled["teacher_ce1"]
    assert p["seeds"] == [0, 3]
    assert p["compare"]["sft"]["n"] == 60 and p["default_at_same_seeds"]["sft"]["n"] == 60
    _close(p["default_at_same_seeds"], ba.pool_compares([per_seed[0]["compare"], per_seed[1]["compare"]]))


def _scored(rng: random.Random, seed: int, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        h = rng.choice([2, 3])
        qid = f"{seed}:q{i}"
        rows.append({"kind": "question", "qid": qid, "correct": rng.random() < 0.45, "parsed": True, "num_hops": h})
        rows += [{"kind": "probe", "qid": qid, "correct": rng.random() < 0.65, "parsed": True, "num_hops": 1} for _ in range(h)]
    return rows


def test_pooled_gate_equals_the_gate_over_all_seeds_predictions():
    from kale_ray.methods.kale.metrics import summarize

    rng = random.Random(3)
    seeds = {s: {m: _scored(rng, s, rng.randint(15, 40)) for m in ("sft", "kale")} for s in (0, 1, 2)}
    seeds[1]["base"] = _scored(rng, 1, 25)  # the base model at one seed only
    per_seed = [{"seed": s, "by_hops": {m: summarize(rows)["known_and_incorrect_by_hops"] for m, rows in ms.items()}}
                for s, ms in seeds.items()]
    gate = ba.pool_gate(per_seed)
    for m in ("sft", "kale"):
        whole = summarize([r for ms in seeds.values() for r in ms[m]])
        got = gate["models"][m]
        assert got["seeds"] == [0, 1, 2]
        assert got["all"]["n"] == whole["n_with_probes"]
        assert got["all"]["accuracy"] == pytest.approx(whole["accuracy"])
        assert got["all"]["probe_accuracy"] == pytest.approx(whole["probe_accuracy"])
        assert got["all"]["n_ki"] == whole["n_known_and_incorrect"]
        assert got["all"]["known_and_incorrect_rate"] == pytest.approx(whole["known_and_incorrect_rate"])
        for h, v in whole["known_and_incorrect_by_hops"].items():
            assert got["by_hops"][h]["accuracy"] == pytest.approx(v["accuracy"])
            assert got["by_hops"][h]["probe_accuracy"] == pytest.approx(v["probe_accuracy"])
            assert got["by_hops"][h]["n_known"] == v["n_known"]
    assert gate["models"]["base"]["seeds"] == [1]
    assert gate["models"]["base"]["all"]["n"] == summarize(seeds[1]["base"])["n_with_probes"]


def test_missed_when_known_is_the_share_of_known_questions():
    per_seed = [{"seed": 0, "by_hops": {"sft": {"2": {"n_with_probes": 10, "n_known": 4, "n_known_and_incorrect": 1,
                                                      "accuracy": 0.5, "probe_accuracy": 0.6}}}}]
    a = ba.pool_gate(per_seed)["models"]["sft"]["all"]
    assert a["known_and_incorrect_rate"] == pytest.approx(0.1)
    assert a["known_and_incorrect_given_known"] == pytest.approx(0.25)
    assert a["probes"] == 20 and a["probes_correct"] == 12


def test_general_questions_pool_paired_over_seeds():
    from kale_ray.runtime.report import paired_difference

    rng = random.Random(5)
    per_seed, sft_all, kale_all = [], {}, {}
    for s in (0, 1):
        sft = {f"g{i}": rng.random() < 0.4 for i in range(200)}
        kale = {f"g{i}": rng.random() < 0.42 for i in range(200)}
        sft_all.update({f"{s}:{k}": v for k, v in sft.items()})
        kale_all.update({f"{s}:{k}": v for k, v in kale.items()})
        per_seed.append({"seed": s, "general": {"accuracy": {"sft": sum(sft.values()) / 200, "kale": sum(kale.values()) / 200,
                                                             "base": None}, "n": 200,
                                                "kale_minus_sft": paired_difference(sft, kale)}})
    per_seed.append({"seed": 2})  # a seed stored before the general questions were recorded
    g = ba.pool_general(per_seed)
    whole = paired_difference(sft_all, kale_all)
    assert g["seeds"] == [0, 1] and set(g["mean_accuracy"]) == {"sft", "kale"}
    assert g["kale_minus_sft"]["diff"] == pytest.approx(whole["diff"])
    assert g["kale_minus_sft"]["ci95"] == pytest.approx(whole["ci95"])


def test_bad_seed_lists_and_results_files_stop_with_one_line(tmp_path):
    assert ba.seed_list("0, 3,4,", "--seeds") == [0, 3, 4] and ba.seed_list("", "--ka-seeds") == []
    with pytest.raises(SystemExit, match=r"--ka-seeds '3,x': 'x' is not a seed"):
        ba.seed_list("3,x", "--ka-seeds")
    bad = tmp_path / "accuracy.json"
    bad.write_text('{"testbed": {"seeds": [0]},\n oops')
    with pytest.raises(SystemExit, match=r"accuracy.json: not JSON \(line 2"):
        ba.stored_entry(bad, "testbed")
    assert ba.stored_entry(tmp_path / "missing.json", "testbed") is None
    bad.write_text('{"testbed": {"seeds": [0]}}')
    assert ba.stored_entry(bad, "testbed") == {"seeds": [0]} and ba.stored_entry(bad, "other") is None
