"""bench/gpu_real_shape.py is meant for a lent GPU; at toy scale every line of it runs here."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).parents[1] / "bench" / "gpu_real_shape.py"


def test_real_shape_benchmark_runs_at_toy_scale(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["gpu_real_shape.py", "--scale", "tiny", "--device", "cpu",
                                      "--skip-bf16", "--out", str(tmp_path)])
    runpy.run_path(str(BENCH), run_name="__main__")
    printed = capsys.readouterr().out
    assert "### nvfp4 experts" in printed and "decoder step / floor" in printed
    row = json.loads((tmp_path / "gpu_real_shape.json").read_text())["rows"][0]
    for key in ("weight_GiB", "prefill_64_s", "step_64_ms", "step_128_ms", "commit_ms", "tok_s_2", "floor_step_ms",
                "static_step_ms", "plan_graph_pool_GiB", "plan_total_graphs_GiB"):
        assert row[key] > 0, key
    # The static step over a prefix encoded into its buffers; its graph pool is measured on CUDA only.
    assert row["static_prefix_in_buffers"] is True and "static_error" not in row and "graph_pool_GiB" not in row
    assert (tmp_path / "gpu_real_shape.md").read_text().startswith("device: CPU")
