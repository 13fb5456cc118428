"""Generated README blocks (results table, benchmark table) replace only their own text."""

from pipelines.results import copy_into_readme


def test_copy_into_readme_replaces_only_the_named_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench -->\nold\n<!-- /bench -->\n<!-- results:tiny -->\nkeep\n<!-- /results -->\n")
    assert copy_into_readme("bench", "| new |\n", readme)
    assert readme.read_text() == (
        "intro\n<!-- bench -->\n| new |\n<!-- /bench -->\n<!-- results:tiny -->\nkeep\n<!-- /results -->\n"
    )
    assert not copy_into_readme("results:fashion32", "x", readme)  # no such block: nothing written
    assert "x" not in readme.read_text()
