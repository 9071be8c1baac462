"""The text of one SQL statement without what ends it: a custom query as a subquery can hold it.

A scanner, not a parser: it knows only what PostgreSQL's lexer needs to tell a ';' or a comment from text inside
a literal, a quoted identifier or a dollar quote.
"""

from __future__ import annotations

import re

_DOLLAR_QUOTE = re.compile(r"\$(?:[A-Za-z_][A-Za-z_0-9]*)?\$")


def statement_body(text: str) -> str:
    """``text`` up to its last character that is SQL, without the ';' (or several) that ends it.

    Whatever follows the body is whitespace and comments (``-- ...`` to the line's end, ``/* ... */``, nested
    as PostgreSQL nests them): a query pasted from psql as ``...; -- November`` kept its ';' when only a last
    character was stripped, and the version query's subquery was a syntax error.
    """
    end = _end_of_sql(text)
    while end and text[end - 1] == ";":
        end = _end_of_sql(text[: end - 1])
    return text[:end]


def _end_of_sql(text: str) -> int:
    """The index just past ``text``'s last character outside whitespace and comments (0 if none)."""
    end = i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
        elif text.startswith("--", i):
            newline = text.find("\n", i)
            i = len(text) if newline < 0 else newline + 1
        elif text.startswith("/*", i):
            i = _end_of_block_comment(text, i)
        else:
            i = end = _end_of_token(text, i)
    return end


def _end_of_block_comment(text: str, start: int) -> int:
    depth, i = 0, start
    while i < len(text):
        if text.startswith("/*", i):
            depth, i = depth + 1, i + 2
        elif text.startswith("*/", i):
            depth, i = depth - 1, i + 2
            if depth == 0:
                return i
        else:
            i += 1
    return len(text)


def _end_of_token(text: str, start: int) -> int:
    """Past the literal, quoted identifier or dollar-quoted string at ``start``, else past its one character."""
    char = text[start]
    escapes = (
        char in "eE"
        and text.startswith("'", start + 1)
        and not (start and (text[start - 1].isalnum() or text[start - 1] in "_$"))
    )
    if escapes:  # E'...': a backslash escapes the quote after it
        i = start + 2
        while i < len(text) and text[i] != "'":
            i += 2 if text[i] == "\\" else 1
        return min(i + 1, len(text))
    if char in "'\"":  # a doubled quote inside ends this one and opens the next: the same end
        close = text.find(char, start + 1)
        return len(text) if close < 0 else close + 1
    dollar = _DOLLAR_QUOTE.match(text, start)
    if dollar and not (start and (text[start - 1].isalnum() or text[start - 1] == "_")):
        close = text.find(dollar.group(), dollar.end())
        return len(text) if close < 0 else close + len(dollar.group())
    return start + 1
