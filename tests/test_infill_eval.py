"""bench/infill_eval.py: its held-out cases, metrics and baselines (the model run itself is the benchmark)."""
import pytest

from bench.infill_eval import edit_similarity, make_cases, package_files, score, window


def test_cases_cut_whole_lines_from_the_held_out_package():
    _, cases = make_cases("click", 6, 3, seed=0)
    assert [c.kind for c in cases] == ["single"] * 6 + ["multi"] * 3
    sources = {p.name: p.read_text(encoding="utf-8") for p in package_files("click")[1]}
    for c in cases:
        assert c.prefix + c.middle + c.suffix == sources[c.file]
        assert c.prefix.endswith("\n") and c.suffix.startswith("\n")
        k = c.middle.count("\n") + 1
        assert k == 1 if c.kind == "single" else 2 <= k <= 4
        assert c.previous.count("\n") + 1 == k and c.previous in c.prefix
        # the one-line baseline repeats the last non-blank line before the middle
        assert c.previous.split("\n")[-1] == [line for line in c.prefix.split("\n") if line.strip()][-1]


def test_metrics():
    assert edit_similarity("  return x\n", "return x") == 1.0  # whitespace around the middle is ignored
    assert edit_similarity("abc", "abd") == pytest.approx(2 / 3)
    assert edit_similarity("", "x = 1") == 0.0
    _, cases = make_cases("click", 2, 0, seed=1)
    exact = score(cases, [c.middle for c in cases])["all"]
    assert (exact["em"], exact["es"], exact["ast"]) == (1.0, 1.0, 1.0)
    assert score(cases, ["" for _ in cases])["single"]["em"] == 0.0


def test_window_keeps_whole_lines():
    prefix, suffix = window("a = 1\nbb = 2\nccc = 3\n", "\nx = 1\ny = 2\n", 10, 8)
    assert prefix == "ccc = 3\n" and suffix == "\nx = 1"


def test_write_benchmarks_replaces_the_table_and_keeps_the_notes(tmp_path, monkeypatch):
    import bench.infill_eval as infill_eval

    monkeypatch.setattr(infill_eval, "ROOT", tmp_path)
    run = "| model | 0.1 |\n\nCommand: `python bench/infill_eval.py --threads 2`"
    (tmp_path / "BENCHMARKS.md").write_text(
        f"# Benchmarks\n\n{infill_eval.SECTION}\n\n| model | 0.0 |\n\n"
        "Command: `python bench/infill_eval.py`\n\nNotes on the run.\n\n## Next section\n")
    infill_eval.write_section(run)
    assert (tmp_path / "BENCHMARKS.md").read_text() == (
        f"# Benchmarks\n\n{infill_eval.SECTION}\n\n{run}\n\nNotes on the run.\n\n## Next section\n")
