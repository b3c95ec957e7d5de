"""The one-line messages of user errors: what `smapctl.errors` makes of a file name or a reader's error."""

import errno

from smapctl.errors import NOT_TORCH_FILE, describe, one_line, path_error, torch_load_reason


def test_one_line_writes_every_line_break_and_tab_as_its_escape():
    """A carriage return left as it is would move the terminal's cursor back over the error's start."""
    assert one_line("a\rb\nc\td") == "a\\rb\\nc\\td"


def test_describe_keeps_the_first_sentence_and_falls_back_on_a_message_without_words():
    assert describe(RuntimeError("PytorchStreamReader failed. Details follow.\nmore"), "x") == (
        "PytorchStreamReader failed"
    )
    assert describe(KeyError(101), "fallback") == "fallback"  # torch.load of a text file
    assert describe(KeyError("ab"), "fallback") == "fallback"  # fewer than three letters in a row


def test_a_zip_reader_seeking_past_the_end_reads_as_a_file_cut_short():
    """torch.load's "[Errno 22] Invalid argument" of a truncated file, with no file named."""
    reason = torch_load_reason(OSError(errno.EINVAL, "Invalid argument"))
    assert reason.startswith("truncated or damaged")
    other = torch_load_reason(OSError(errno.ENOENT, "No such file or directory"))
    assert other == "[Errno 2] No such file or directory"
    assert torch_load_reason(EOFError()) == NOT_TORCH_FILE


def test_a_path_over_120_characters_is_shortened_in_its_middle():
    whole = "d/" + "x" * 118
    assert path_error(OSError(36, "File name too long", whole)) == f"{whole}: file name too long"
    long = "d/" + "x" * 119
    shown = path_error(OSError(36, "File name too long", long))
    assert shown == f"{long[:60]}...{long[-40:]} (121 characters): file name too long"
