"""The reports' Markdown tables: GitHub-flavoured tables (a header row, a delimiter row of --- / ---:, body rows)."""
import pytest

from sdca.engine import markdown as md


def test_header_rule_and_rows_in_gfm_form():
    lines = md.table(["class", "a", "b"], "lrr", [["road", "1.0", "n/a"]])
    assert lines == ["| class | a | b |", "| --- | ---: | ---: |", "| road | 1.0 | n/a |"]
    # The same cells split on the pipes come back: each row has one cell per column.
    assert all(len(line.strip("|").split("|")) == 3 for line in lines)


def test_an_empty_cell_is_one_space_and_a_wrong_alignment_is_refused():
    assert md.row(["", "x"]) == "| | x |"
    with pytest.raises(ValueError, match="align"):
        md.header(["a", "b"], "l")
