"""`qwenforge demo --quick` on the real embedded model, as a user runs it (a file of its own: the
longest test, so the other pytest-xdist worker takes the rest of the CLI tests meanwhile)."""

import pytest

from test_cli import run


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, embedded_model_dir):
    result = run("demo", "--quick", "--workdir", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "qwenforge spec" in result.stdout and "done" in result.stdout
    # the real model answers, keeps its answer through convert + heal, and answers over HTTP; every stage is timed
    assert "same answer as the source" in result.stdout, result.stdout[-3000:]
    assert "/v1/chat/completions -> " in result.stdout and "Paris" in result.stdout.split("/v1/chat/completions -> ")[1]
    assert "time per stage" in result.stdout and "total" in result.stdout
