"""The one-line messages of user errors: what `smapctl.errors` makes of a file name or a reader's error."""

from smapctl.errors import one_line


def test_one_line_writes_every_line_break_and_tab_as_its_escape():
    """A carriage return left as it is would move the terminal's cursor back over the error's start."""
    assert one_line("a\rb\nc\td") == "a\\rb\\nc\\td"
