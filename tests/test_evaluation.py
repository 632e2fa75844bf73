"""``python -m relax_pl evaluate``: the estimators against brute force, and the command end to end on a tiny model
whose reward varies (so a trained checkpoint and the base model differ and the figures are not all 0)."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path

import pytest

from relax_pl.cli import main as cli_main
from relax_pl.data.tasks import HELDOUT_SIZE, word_problems
from relax_pl.evaluation import PromptResult, bootstrap_interval, main, paired, pass_at_k, powers_of_two, summarise

from probes import moved_weights, policy_weights, tiny_recipe


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """The share of all k-subsets of n samples (c of them right) that hold a right one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)
    assert pass_at_k(16, 4, 1) == 0.25  # pass@1 is the sample accuracy


def test_pass_at_k_has_no_overflow_for_large_n():
    # C(10000, 5000) has 3,008 digits: a float ratio would overflow; the exact integer ratio does not
    assert pass_at_k(10_000, 1, 5_000) == pytest.approx(0.5, abs=1e-12)
    assert pass_at_k(10_000, 0, 5_000) == 0.0 and pass_at_k(10_000, 5_001, 5_000) == 1.0
    stable = 1 - math.prod(1 - 5_000 / i for i in range(10_000 - 3 + 1, 10_001))  # Chen et al.'s product form
    assert pass_at_k(10_000, 3, 5_000) == pytest.approx(stable, rel=1e-12)
    with pytest.raises(ValueError, match="0 <= c <= n and 1 <= k <= n"):
        pass_at_k(4, 5, 1)


def test_summary_and_paired_differences():
    assert powers_of_two(16) == [1, 2, 4, 8, 16] and powers_of_two(6) == [1, 2, 4, 6]
    a = [PromptResult(i, "s", [1.0, 0.0, 0.0, 0.0], 0.0) for i in range(10)]
    b = [PromptResult(i, "s", [1.0, 1.0, 0.0, 0.0], float(i % 2)) for i in range(10)]
    first, other = summarise(a), summarise(b)
    assert first["figures"]["pass@1"]["value"] == 0.25 and other["figures"]["mean@1"]["value"] == 0.5
    assert first["figures"]["mean@2"]["value"] == 0.5 and first["figures"]["mean@k"]["value"] == 0.25
    assert first["figures"]["pass@4"]["value"] == 1.0
    difference = paired(first, other)
    assert difference["mean@1"]["value"] == 0.5 and difference["pass@1"]["value"] == 0.25
    assert difference["pass@1"]["low"] == difference["pass@1"]["high"] == 0.25  # the same gap on every prompt
    low, high = bootstrap_interval([0.0, 1.0] * 50)
    assert low < 0.5 < high and high - low < 0.3


def test_heldout_word_problems_share_no_prompt_with_training():
    relax_small = {"steps": 1, "max_value": 9}
    heldout = word_problems("heldout", **relax_small)
    train = word_problems("train", num_samples=2000, **relax_small)
    assert len(heldout) == HELDOUT_SIZE == len({row["problem"] for row in heldout}) >= 256
    assert not {row["problem"] for row in heldout} & {row["problem"] for row in train}
    sources = [row["data_source"] for row in heldout]
    assert sources[:4] == ["word_problems/1-step", "word_problems/2-step"] * 2
    assert sources.count("word_problems/2-step") == HELDOUT_SIZE // 2  # harder than training: one step more
    assert all(row["problem"].count(", then ") == 1 for row in heldout[1::2])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("evaluate")
    recipe = tiny_recipe(
        folder, tiny_model, checkpoint_every=2, logger=False,
        trainer={"max_steps": 2},
        model={"reward": {"class_path": "probes.LengthParityReward"}, "optimizer": {"lr": 5e-3}},
        data={"val_source": "builtin:arithmetic", "val_batch_size": 2},
    )
    cli_main(["fit", "--config", str(recipe)])
    checkpoint = folder / "checkpoints" / "last.ckpt"
    assert moved_weights(policy_weights(checkpoint), tiny_model)  # it trained
    return recipe, checkpoint


def test_evaluate_compares_a_checkpoint_with_the_base_model(tmp_path, trained):
    recipe, checkpoint = trained
    out = tmp_path / "evaluation"
    report = main(["--config", str(recipe), "--ckpt_path", "base", "--ckpt_path", str(checkpoint),
                   "--num_samples", "4", "--max_prompts", "5", "--out", str(out)])
    written = json.loads((out / "evaluation.json").read_text())
    assert (out / "evaluation.png").stat().st_size > 0
    assert written["settings"]["prompts"] == 5 and written["settings"]["num_samples"] == 4
    assert written["settings"]["scored_by"] == "overall reward (no reward reports an accuracy)"  # LengthParityReward
    base, after = written["checkpoints"]
    assert base["path"] is None and base["step"] is None and after["path"] == str(checkpoint) and after["step"] == 2
    assert base["rows"] == after["rows"] == [0, 1, 2, 3, 4]
    for entry in (base, after):
        figures, per_prompt = entry["figures"], entry["per_prompt"]
        assert set(figures) >= {"mean@1", "mean@2", "mean@4", "pass@1", "pass@2", "pass@4", "mean@k", "pass@k"}
        for name, values in per_prompt.items():
            assert len(values) == 5 and figures[name]["value"] == pytest.approx(statistics.fmean(values))
            assert figures[name]["low"] <= figures[name]["value"] <= figures[name]["high"]
        assert all(p <= q for p, q in zip(per_prompt["pass@1"], per_prompt["pass@4"]))
    # the parity reward is 1 on about half the answers: the figures are neither all 0 nor all 1
    assert 0 < after["figures"]["pass@1"]["value"] < 1
    difference = written["paired"][0]["figures"]
    for name in ("mean@1", "pass@1", "pass@4"):
        expected = after["figures"][name]["value"] - base["figures"][name]["value"]
        assert difference[name]["value"] == pytest.approx(expected)
    assert report == json.loads(json.dumps(report))  # what was returned is what was written

    # named after the checkpoint, "base" is still the base model (it was the checkpoint's weights again before)
    reversed_order = main(["--config", str(recipe), "--ckpt_path", str(checkpoint), "--ckpt_path", "base",
                           "--num_samples", "4", "--max_prompts", "5", "--out", str(tmp_path / "reversed")])
    assert [entry["path"] for entry in reversed_order["checkpoints"]] == [str(checkpoint), None]
    assert base["per_prompt"] != after["per_prompt"]  # the two are told apart
    assert reversed_order["checkpoints"][1]["per_prompt"] == base["per_prompt"]
    assert reversed_order["checkpoints"][0]["per_prompt"] == after["per_prompt"]


def test_evaluate_reads_a_jsonl_source_as_training_does(tmp_path, trained):
    """A user's own held-out file (MATH-500 exported to JSONL, say) in place of the recipe's validation source."""
    recipe, checkpoint = trained
    rows = [{"problem": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 1)]]
    source = tmp_path / "heldout.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = main(["--config", str(recipe), "--ckpt_path", str(checkpoint), "--num_samples", "2",
                   "--data.val_source", str(source), "--out", str(tmp_path / "out")])
    assert report["settings"]["val_source"] == str(source) and report["settings"]["prompts"] == 3
    [entry] = report["checkpoints"]
    assert entry["rows"] == [0, 1, 2] and all(len(v) == 3 for v in entry["per_prompt"].values())
    assert (tmp_path / "out" / "evaluation.json").exists()


def test_evaluate_names_what_is_wrong(tmp_path, trained, capsys):
    recipe, _ = trained
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(recipe), "--ckpt_path", str(tmp_path / "missing.ckpt")])
    assert exit_.value.code == 2
    assert f"checkpoint '{tmp_path / 'missing.ckpt'}' (--ckpt_path) does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", str(recipe), "--num_samples", "0"])
    assert "--num_samples must be >= 1, got 0" in capsys.readouterr().err
