"""The one-line messages of user errors: what `smapctl.errors` makes of a file name or a reader's error."""

from smapctl.errors import describe, one_line


def test_one_line_writes_every_line_break_and_tab_as_its_escape():
    """A carriage return left as it is would move the terminal's cursor back over the error's start."""
    assert one_line("a\rb\nc\td") == "a\\rb\\nc\\td"


def test_describe_keeps_the_first_sentence_and_falls_back_on_a_message_without_words():
    assert describe(RuntimeError("PytorchStreamReader failed. Details follow.\nmore"), "x") == (
        "PytorchStreamReader failed"
    )
    assert describe(KeyError(101), "fallback") == "fallback"  # torch.load of a text file
    assert describe(KeyError("ab"), "fallback") == "fallback"  # fewer than three letters in a row
