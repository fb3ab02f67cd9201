"""Text files as users save them: UTF-8 with or without a byte-order mark, UTF-16 with one, and
the line of the first byte that is not UTF-8 (shared by data files, configs and templates)."""

from __future__ import annotations

from pathlib import Path

# "utf-8-sig" reads UTF-8 and drops a leading byte-order mark when there is one.
ENCODING = "utf-8-sig"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def text_encoding(path: Path) -> str:
    """UTF-8 (BOM or not), or UTF-16 when the file starts with its byte-order mark (as Windows
    PowerShell's ``>`` and Excel's "Unicode text" write)."""
    with path.open("rb") as f:
        return "utf-16" if f.read(2) in UTF16_BOMS else ENCODING


def bad_utf8(path: Path) -> str:
    """``FILE:LINE: not UTF-8 text (byte 0x.. at column C)`` for the first byte that is not UTF-8.

    The file is read again line by line (only after decoding it failed), so a user with a long
    file learns which line to fix.
    """
    if text_encoding(path) == "utf-16":
        return f"{path}: not valid UTF-16 text (it starts with a UTF-16 byte-order mark); save the file as UTF-8"
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode(ENCODING if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                return (
                    f"{path}:{lineno}: not UTF-8 text (byte 0x{line[e.start]:02x} at column "
                    f"{e.start + 1}); save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                )
    return f"{path}: not UTF-8 text; save the file as UTF-8"
