"""Next-edit suggestions: the region, the line hunks, the undo and rewrite rules
(engine/next_edit.py), the language server's edit history (lsp/edits.py), and the `next_edit`
request through the real daemon on the bundled model, where every byte outside the region must
stay as it was."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from dgemma.engine.next_edit import (LineEdit, RecentEdit, apply_edits, changed_lines, edits_prompt, line_hunks,
                                     lines_of, pick_region, recent_edits_between, region_edits, undoes)
from dgemma.lsp.edits import PAUSE_S, EditHistory
from test_daemon_util import Raw, daemon  # noqa: F401  (fixture)

STATS = ("def mean(values):\n    total = 0\n    for v in values:\n        total += v\n"
         "    return total / len(values)\n\n\ndef variance(values):\n    m = mean(values)\n"
         "    return sum((v - m) ** 2 for v in values) / len(values)\n")
RENAMED = STATS.replace("def mean(values):", "def mean(numbers):")


def test_lines_split_at_newlines_only():
    assert lines_of("a\r\nb\x0cc\u2028d\ne") == ["a\r\n", "b\x0cc\u2028d\n", "e"]
    assert lines_of("") == [] and lines_of("\n") == ["\n"]


@settings(max_examples=200, deadline=None)
@given(old=st.lists(st.sampled_from(["a\n", "b\n", "c\r\n", "\tx\n", "é\n", "\n"]), max_size=12),
       new=st.lists(st.sampled_from(["a\n", "b\n", "c\r\n", "\tx\n", "é\n", "\n"]), max_size=12))
def test_recent_edits_replay_old_into_new(old, new):
    """The hunks between two texts, applied to the old one, give the new one exactly."""
    a, b = "".join(old), "".join(new)
    edits = [LineEdit(i1, i2, "".join(lines_of(b)[j1:j2])) for i1, i2, j1, j2 in line_hunks(a, b)]
    assert "".join(apply_edits(lines_of(a), edits)) == b
    assert all(e.old != e.new for e in recent_edits_between(a, b))


def test_one_keystroke_is_one_small_hunk():
    assert recent_edits_between(STATS, RENAMED) == [RecentEdit(0, "def mean(values):\n", "def mean(numbers):\n")]
    inserted = STATS.replace("    total = 0\n", "    total = 0\n    count = 0\n")
    assert recent_edits_between(STATS, inserted) == [RecentEdit(2, "", "    count = 0\n")]


@pytest.mark.parametrize("count,cursor,last,size,expected", [
    (100, 50, RecentEdit(45, "x\n", "y\n"), 20, (38, 58)),  # cursor and last edit, the rest around them
    (100, 98, None, 20, (80, 100)),  # at the end: the region shifts up
    (100, 0, None, 20, (0, 20)),
    (5, 2, None, 20, (0, 5)),  # a short file is the region
    (100, 90, RecentEdit(10, "x\n", "y\n"), 20, (80, 100)),  # an edit far away: the cursor's region
    (100, 500, None, 10, (90, 100)),  # a cursor past the end is clamped
])
def test_region_holds_cursor_and_last_edit(count, cursor, last, size, expected):
    assert pick_region(count, cursor, last, size) == expected


def test_undo_of_the_last_edit_is_no_suggestion():
    lines = lines_of(RENAMED)
    last = RecentEdit(0, "def mean(values):\n", "def mean(numbers):\n")
    back = region_edits(lines, (0, 5), STATS.split("\n\n\n")[0] + "\n")
    assert back == [LineEdit(0, 1, "def mean(values):\n")] and undoes(lines, back, last)
    onward = region_edits(lines, (0, 5), RENAMED.split("\n\n\n")[0].replace("in values", "in numbers")
                          .replace("len(values)", "len(numbers)") + "\n")
    assert [e.start_line for e in onward] == [2, 4] and not undoes(lines, onward, last)
    assert changed_lines(onward) == 2


def test_prompt_shows_recent_edits_as_a_diff():
    prompt = edits_prompt([RecentEdit(0, "def mean(values):\n", "def mean(numbers):\n")], "stats.py")
    assert "stats.py" in prompt and "-def mean(values):" in prompt and "+def mean(numbers):" in prompt
    assert "@@ -1,1 +1,1 @@" in prompt


# ---- the language server's history ----------------------------------------------------

def test_history_coalesces_a_burst_and_splits_at_pauses_and_jumps():
    h = EditHistory()
    h.opened("u", STATS)
    t = 100.0
    text = STATS
    for i, ch in enumerate("numbers"):  # typing over `values` in the first line, one key at a time
        text = text.replace("def mean(values):" if i == 0 else f"def mean({'numbers'[:i]}):",
                            f"def mean({'numbers'[:i + 1]}):")
        t += 0.1
        h.changed("u", text, t)
    assert h.recent("u", t) == [RecentEdit(0, "def mean(values):\n", "def mean(numbers):\n")]
    # A pause, then an edit further down: two edits, oldest first, the last in the current lines.
    text = text.replace("    m = mean(values)\n", "    m = mean(values)  # centre\n")
    h.changed("u", text, t + PAUSE_S + 1)
    recent = h.recent("u", t + PAUSE_S + 1)
    assert [e.line for e in recent] == [0, 8] and recent[-1].new == "    m = mean(values)  # centre\n"
    # No pause, but far from the burst: a new burst all the same.
    text2 = text.replace("    total = 0\n", "    total = 0.0\n")
    h.changed("u", text2, t + PAUSE_S + 1.1)
    assert [e.line for e in h.recent("u", t + PAUSE_S + 1.1)] == [0, 8, 1]
    h.forget("u")
    assert h.recent("u") == []


# ---- through the daemon ----------------------------------------------------------------

def _call(daemon, params):
    with Raw(daemon.socket) as c:
        return c.call("next_edit", params)[-1]


@pytest.mark.parametrize("text", [RENAMED, RENAMED.replace("\n", "\r\n"),
                                  "# ünïcode ✓\n" + RENAMED.replace("    ", "\t") + "x = 1"])
def test_next_edit_changes_nothing_outside_its_region(daemon, text):
    """A 40-line file with the rename at the top: whatever the model proposes lies inside the
    region it reports, the lines around it are the same bytes, and an answer is for this text."""
    filler = [f"value_{i} = {i}\n" for i in range(40)]
    text = text + "".join(filler) if text.endswith("\n") else text + "\n" + "".join(filler)
    lines = lines_of(text)
    last = recent_edits_between(text.replace("def mean(numbers)", "def mean(values)"), text)
    for seed in range(3):
        reply = _call(daemon, {"text": text, "cursor": {"line": 0, "character": 0}, "region_lines": 12,
                               "recent_edits": [vars(e) for e in last], "seed": seed, "stream": False})
        res = reply["result"]
        start, end = res["region"]["start_line"], res["region"]["end_line"]
        assert 0 <= start < end <= len(lines) and end - start <= 12 and res["model"]
        edited = apply_edits(lines, [LineEdit(**e) for e in res["edits"]])
        for e in res["edits"]:
            assert start <= e["start_line"] <= e["end_line"] <= end
        assert edited[:start] == lines[:start]
        assert edited[len(edited) - (len(lines) - end):] == lines[end:]
        assert not undoes(lines, [LineEdit(**e) for e in res["edits"]], last[-1])


def test_next_edit_reads_a_path_and_refuses_bad_input(daemon, tmp_path: Path):
    f = tmp_path / "stats.py"
    f.write_text(RENAMED)
    last = [vars(e) for e in recent_edits_between(STATS, RENAMED)]
    res = _call(daemon, {"path": str(f), "cursor": {"line": 0}, "recent_edits": last, "stream": False})["result"]
    assert "edits" in res and res["region"]["end_line"] <= len(lines_of(RENAMED))
    (tmp_path / "latin1.py").write_bytes(b"caf\xe9\n")
    bad = [
        ({"cursor": {"line": 0}}, "text"),
        ({"text": "x\n"}, "cursor"),
        ({"text": "x\n", "cursor": {"line": -1}}, "line"),
        ({"text": "x\n", "cursor": {"line": 0}, "recent_edits": ["x"]}, "recent_edits[0]"),
        ({"text": "x\n", "cursor": {"line": 0}, "recent_edits": [{"line": 0, "old": 3}]}, "old"),
        ({"text": "x\n", "cursor": {"line": 0}, "region_lines": 1000}, "region_lines"),
        ({"path": str(tmp_path / "missing.py"), "cursor": {"line": 0}}, "cannot read"),
        ({"path": str(tmp_path / "latin1.py"), "cursor": {"line": 0}}, "not UTF-8"),
    ]
    for params, words in bad:
        err = _call(daemon, params)
        assert err["type"] == "error" and err["error"]["code"] == "invalid_params", (params, err)
        assert words in err["error"]["message"], (params, err)


def test_next_edit_of_an_empty_document_is_no_edit(daemon):
    res = _call(daemon, {"text": "", "cursor": {"line": 0}, "recent_edits": [{"line": 0, "old": "x\n", "new": ""}],
                         "stream": False})["result"]
    assert res["edits"] == [] and res["region"] == {"start_line": 0, "end_line": 0}


# ---- `dgemma next` ----------------------------------------------------------------------

FILLER = "".join(f"value_{i} = {i}\n" for i in range(40))


def _repo(tmp_path: Path) -> Path:
    import subprocess

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "stats.py").write_text(STATS + FILLER)
    git = ["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "stats.py"], check=True)
    subprocess.run([*git, "commit", "-qm", "stats"], check=True)
    return repo


def test_next_follows_the_uncommitted_change_and_moves_nothing_outside_the_region(daemon, tmp_path):
    from test_daemon_util import dgemma

    f = _repo(tmp_path) / "stats.py"
    f.write_text(RENAMED + FILLER)
    before = f.read_bytes()
    r = dgemma(["next", str(f), "--dry-run", "--seed", "0", "--region", "12"], daemon.env)
    assert r.returncode == 0, r.stderr
    assert f.read_bytes() == before
    assert r.stdout.startswith("--- a/") or "no next edit in" in r.stderr, (r.stdout, r.stderr)
    r = dgemma(["next", str(f), "--yes", "--seed", "0", "--region", "12"], daemon.env)
    assert r.returncode == 0, r.stderr
    after = f.read_bytes().decode().split("\n")
    old = before.decode().split("\n")
    # The region is at most 12 lines around line 1: the filler below it is byte for byte the same.
    assert after[len(after) - 35:] == old[len(old) - 35:]
    if r.stdout:
        assert "applied to" in r.stderr
        assert dgemma(["undo", str(f)], daemon.env).returncode == 0
    assert f.read_bytes() == before


def test_next_refuses_what_it_cannot_follow(daemon, tmp_path):
    from test_daemon_util import dgemma

    f = _repo(tmp_path) / "stats.py"
    r = dgemma(["next", str(f)], daemon.env)
    assert r.returncode == 1 and "no changes to follow" in r.stderr
    loose = tmp_path / "loose.py"
    loose.write_text(RENAMED)
    r = dgemma(["next", str(loose)], daemon.env)
    assert r.returncode == 1 and "not in a git repository" in r.stderr and "--after" in r.stderr
    old = tmp_path / "old.py"
    old.write_text(STATS)
    r = dgemma(["next", str(loose), "--after", str(old), "--line", "99"], daemon.env)
    assert r.returncode == 1 and "past the end" in r.stderr
    r = dgemma(["next", str(loose), "--after", str(old), "--dry-run", "--seed", "1"], daemon.env)
    assert r.returncode == 0, r.stderr
    assert loose.read_text() == RENAMED


def test_eval_cuts_two_hunk_commits_and_scores_against_the_commit(tmp_path):
    """bench/next_edit_eval.py on a repository made here: the commit that renamed a parameter
    and its first use is one case; the commit's own second hunk scores exact, no edit does not."""
    import subprocess
    import sys

    sys.path.append(str(Path(__file__).resolve().parent.parent))
    from bench.next_edit_eval import cut_cases, score

    repo = _repo(tmp_path)
    f = repo / "stats.py"
    f.write_text((RENAMED + FILLER).replace("    for v in values:", "    for v in numbers:"))
    git = ["git", "-C", str(repo), "-c", "user.email=t@example.com", "-c", "user.name=t"]
    subprocess.run([*git, "commit", "-qam", "rename"], check=True)
    cases = cut_cases(repo, 5, 0)
    assert len(cases) == 1 and cases[0].path == "stats.py"
    case = cases[0]
    assert case.recent == RecentEdit(0, "def mean(values):\n", "def mean(numbers):\n")
    lines = lines_of(case.text)
    commit = [LineEdit(i1, i2, "".join(lines_of(case.expected)[j1:j2]))
              for i1, i2, j1, j2 in line_hunks(case.text, case.expected)]
    exact, es, baseline = score(case, commit)
    assert exact and es == 1.0 and baseline < 1.0
    assert score(case, [])[:2] == (False, baseline)
